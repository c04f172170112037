"""Recovery: how well a sums teacher continues answers that someone else started.

On-policy distillation asks the teacher for its next-token distribution on the student's
own half-written answers. That is worth copying only where the teacher, handed such a
prefix, would go on to the right answer. Recovery measures it: prefixes are cut at a random
token of answers that students actually wrote (greedy and sampled) or of hand-made
mixed-style workings; the prefixes whose working is still sound
(:func:`hpd.tasks.sums_working.sound_prefix`) are continued greedily by the teacher from
``[bos] + prompt + prefix``, and recovery is the share whose final answer is right. A
teacher's own accuracy is the same measure on the empty prefix.

Prefixes are token ids, as the student wrote them (a teacher scores a rollout's own ids).
Torch is imported only by the functions that generate.
"""

from __future__ import annotations

import random
import statistics

from hpd.tasks import sums
from hpd.tasks.sums_working import finish, random_working, shape, sound_prefix, sound_working

# the pairs of styles a hand-made prefix opens in and goes on in (each its first line or two)
MIXES = [(a, b) for a in sums.STYLES for b in sums.STYLES if a != b]


def cut(prompt: str, generated: list, tok, rng: random.Random, source: str) -> dict:
    """One prefix of a student's generated ids, cut after a random token and before its last
    (at least one token is left to write): a row with the prompt, the prefix ids and text, the
    source, and whether the prefix is sound."""
    content = [t for t in generated if t != tok.eos_token_id]
    k = rng.randint(1, len(content) - 1) if len(content) > 1 else 0
    text = tok.decode(content[:k], skip_special_tokens=True)
    return {"prompt": prompt, "prefix": content[:k], "text": text, "source": source,
            "sound": k > 0 and sound_prefix(prompt, text)}


def handmade(problems: list, tok, rng: random.Random, per_problem: int = 1) -> list:
    """Mixed-style prefixes: a working that opens with the first line or two of one style and goes
    on in another (:func:`hpd.tasks.sums_working.finish`), cut at a random token after the switch."""
    rows = []
    for p in problems:
        for _ in range(per_problem):
            first, then = rng.choice(MIXES)
            opening = p.completion(first).split("\n")[: rng.choice((1, 2))]
            lines = opening + finish(p, opening, then)
            text = "\n".join(lines)
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            switch = len("\n".join(opening)) + 1
            after = [i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= switch]
            k = rng.choice(after[:-1])  # at least one token is left to write
            ids = enc["input_ids"][:k]
            rows.append({"prompt": p.prompt(), "prefix": ids, "text": tok.decode(ids),
                         "source": f"hand-made/{first}+{then}", "sound": True})
    return rows


def continuation_rows(problems: list, tok, rng: random.Random) -> list:
    """Rows that teach a teacher to continue a sound working it did not start (DAgger-style
    data): per problem, a random mixed-style working (hpd.tasks.sums_working.random_working) cut
    at a random token of a random line; the completion is that prefix, then the rest of the line
    and a correct finish (hpd.tasks.sums_working.finish). `given` counts the prefix's tokens,
    which carry no loss (scripts.model_maker.encode): the teacher learns the continuation only,
    so its own answers to a bare prompt keep their styles."""
    rows = []
    for p in problems:
        lines = [line for line, _ in random_working(p, rng)]
        j = rng.randrange(len(lines))
        head = lines[: j + 1]
        text = "\n".join(head + finish(p, head))
        start = len("\n".join(lines[:j])) + (1 if j else 0)
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        inside = [i for i, (s, _) in enumerate(offsets) if start <= s < start + len(lines[j]) and i > 0]
        rows.append({"prompt": p.prompt(), "completion": text, "given": rng.choice(inside)})
    return rows


def read_prefixes(path, tok) -> list:
    """Prefix rows written by benchmarks.sums_recovery (prompt, prefix ids, source), with their
    text and soundness worked out again from the ids."""
    rows = sums.read_jsonl(path)
    for r in rows:
        r["text"] = tok.decode(r["prefix"], skip_special_tokens=True)
        r["sound"] = bool(r["prefix"]) and sound_prefix(r["prompt"], r["text"])
    return rows


HANDMADE_SEED = 1


def measure(model, tok, problems: list, prefixes_path=None, *, max_new_tokens: int = 48) -> dict:
    """A teacher's own accuracy on `problems`, and its recovery on hand-made prefixes of them
    (seed HANDMADE_SEED) and on the students' prefixes at `prefixes_path` where given."""
    out = {"own_accuracy": own_accuracy(model, tok, problems, max_new_tokens=max_new_tokens),
           "hand-made": recovery(model, tok, handmade(problems, tok, random.Random(HANDMADE_SEED)),
                                 max_new_tokens=max_new_tokens)}
    if prefixes_path is not None:
        out["students"] = recovery(model, tok, read_prefixes(prefixes_path, tok), max_new_tokens=max_new_tokens)
    return out


def recovery(model, tok, rows: list, *, max_new_tokens: int = 48, batch_size: int = 100) -> dict:
    """The teacher's greedy continuation of every sound row: recovery (share with the right
    final answer) and the share whose whole working is sound, over all sound rows, per source
    and per shape of the prefix (hpd.tasks.sums_working.shape)."""
    from hpd.tasks.sums_models import decode, generate_ids

    sound = [r for r in rows if r["sound"]]
    gens = generate_ids(model, tok, [r["prompt"] for r in sound], prefixes=[r["prefix"] for r in sound],
                        max_new_tokens=max_new_tokens, batch_size=batch_size)
    scored = []
    for r, g in zip(sound, gens):
        text = tok.decode(r["prefix"], skip_special_tokens=True) + decode(tok, g)
        scored.append({"source": r["source"], "shape": shape(r["prompt"], r["text"]),
                       "right": float(sums.extract_answer(text) == str(sums.parse_prompt(r["prompt"]).answer)),
                       "sound": float(sound_working(r["prompt"], text))})
    cut_by = {}
    for r in rows:
        cut_by[r["source"]] = cut_by.get(r["source"], 0) + 1
    return {**_summary(scored), "cut": len(rows),
            "by_source": {s: {**_summary([x for x in scored if x["source"] == s]), "cut": n}
                          for s, n in sorted(cut_by.items())},
            "by_shape": {s: _summary([x for x in scored if x["shape"] == s])
                         for s in sorted({x["shape"] for x in scored})}}


def _summary(scored: list) -> dict:
    if not scored:
        return {"recovery": None, "sound_finish": None, "prefixes": 0}
    return {"recovery": statistics.fmean(x["right"] for x in scored),
            "sound_finish": statistics.fmean(x["sound"] for x in scored), "prefixes": len(scored)}


def breaks(prompts: list, texts: list) -> dict:
    """Where whole answers stop being sound: the share sound throughout, the share that open in
    the teacher's style (a forward or backward first line), and of those the share whose first
    line is already wrong and the share that go wrong on the line after it."""
    n = max(len(texts), 1)
    counts = {"sound": 0, "teacher_opening": 0, "wrong_first_line": 0, "wrong_second_line": 0}
    for prompt, text in zip(prompts, texts):
        counts["sound"] += sound_working(prompt, text)
        if sums.opening_of(prompt, text) in ("forward", "backward"):
            lines = text.split("\n")
            good = next((k for k in range(len(lines)) if not sound_prefix(prompt, "\n".join(lines[: k + 1]) + "\n")),
                        len(lines))
            counts["teacher_opening"] += 1
            counts["wrong_first_line"] += good == 0
            counts["wrong_second_line"] += good == 1
    return {k: v / n for k, v in counts.items()}


def own_accuracy(model, tok, problems: list, *, max_new_tokens: int = 48) -> float:
    """Greedy exact match from the bare prompt: the teacher's own accuracy, the empty prefix."""
    from hpd.tasks.sums_models import generate_texts

    texts = generate_texts(model, tok, [p.prompt() for p in problems], max_new_tokens=max_new_tokens)
    return statistics.fmean(float(sums.extract_answer(t) == str(p.answer)) for p, t in zip(problems, texts))


__all__ = ["MIXES", "HANDMADE_SEED", "cut", "handmade", "continuation_rows", "read_prefixes", "measure", "recovery",
           "breaks", "own_accuracy"]
