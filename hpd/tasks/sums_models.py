"""The shipped sums teacher, student and data (``hpd/assets/sums``), and measurements on them.

Same sequence format as the tiny models: ``[bos] + prompt + completion + [eos]``, loss on
the completion and eos. Torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from hpd.tasks import sums

SUMS_DIR = Path(__file__).resolve().parent.parent / "assets" / "sums"
TEACHER_DIR = SUMS_DIR / "teacher"
STUDENT_DIR = SUMS_DIR / "student"
TRAIN_PATH = SUMS_DIR / "train.jsonl"  # distillation data: pairs-style reference solutions
HELD_PATH = SUMS_DIR / "held.jsonl"  # held-out prompts with pairs-style references
HELD_TEACHER_PATH = SUMS_DIR / "held_teacher.jsonl"  # the same prompts, answered by the teacher (T=1)
MANIFEST_PATH = SUMS_DIR / "manifest.json"


def load_manifest() -> dict:
    return json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))


def load_rows(split: str = "held") -> list:
    return sums.read_jsonl({"train": TRAIN_PATH, "held": HELD_PATH, "held_teacher": HELD_TEACHER_PATH}[split])


def completion_logprobs(model, tok, prompt: str, completions: list) -> list:
    """log p(completion + eos | [bos] + prompt) under a torch causal LM, one value per completion."""
    import torch

    from hpd.data.examples import encode_row

    out = []
    for completion in completions:
        ex = encode_row({"prompt": prompt, "completion": completion}, tok)
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        mask = torch.tensor(ex.loss_mask[1:])
        out.append(float(logp.gather(-1, targets[:, None])[:, 0][mask].sum()))
    return out


def style_probabilities(model, tok, problems) -> dict:
    """Mean over problems of p(style's completion | prompt), per style, and the mean of their sum."""
    totals = {s: 0.0 for s in sums.STYLES}
    for p in problems:
        lps = completion_logprobs(model, tok, p.prompt(), [p.completion(s) for s in sums.STYLES])
        for s, lp in zip(sums.STYLES, lps):
            totals[s] += math.exp(lp)
    n = max(len(problems), 1)
    out = {s: v / n for s, v in totals.items()}
    out["total"] = sum(out[s] for s in sums.STYLES)
    return out


def generate_texts(model, tok, prompts, *, greedy: bool = True, samples: int = 1, max_new_tokens: int = 96,
                   batch_size: int = 100, temperature: float = 1.0) -> list:
    """Completions (decoded text, eos dropped) of a torch causal LM through the torch backend's
    generation; `samples` per prompt, prompt-major."""
    gens = generate_ids(model, tok, prompts, greedy=greedy, samples=samples, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, temperature=temperature)
    return [decode(tok, g) for g in gens]


def generate_ids(model, tok, prompts, *, prefixes=None, greedy: bool = True, samples: int = 1,
                 max_new_tokens: int = 96, batch_size: int = 100, temperature: float = 1.0) -> list:
    """The generated token ids (eos included where written) of a torch causal LM for each prompt,
    `samples` per prompt, prompt-major. With `prefixes` (one list of ids per prompt), each
    generation continues [bos] + prompt + its prefix, and returns only what follows the prefix."""
    from types import SimpleNamespace

    from hpd.backends.torch import TorchBackend
    from hpd.data.examples import prompt_ids

    backend = TorchBackend(SimpleNamespace(device="cpu"))
    heads = [prompt_ids({"prompt": p}, tok)[0] + (list(prefixes[i]) if prefixes is not None else [])
             for i, p in enumerate(prompts)]
    jobs = [h for h in heads for _ in range(samples)]
    out = []
    for start in range(0, len(jobs), batch_size):
        out += [list(g) for g in backend.generate(model, tok, jobs[start:start + batch_size],
                                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                                  top_p=1.0, top_k=0, greedy=greedy)]
    return out


def decode(tok, ids) -> str:
    """Generated ids as text, eos dropped."""
    return tok.decode([t for t in ids if t != tok.eos_token_id], skip_special_tokens=True)


def score(prompts, answers, texts, samples: int = 1) -> dict:
    """Exact match of the final answer, the share of each style of working among `texts`
    (prompt-major, `samples` texts per prompt; "other" for none of them in full) and the share
    of each style's first line (`openings`); `answers` are reference completions."""
    hits = 0
    styles, openings = ({s: 0 for s in (*sums.STYLES, "other")} for _ in range(2))
    for i, text in enumerate(texts):
        j = i // samples
        hits += int(sums.is_correct(text, answers[j]))
        styles[sums.style_of(prompts[j], text) or "other"] += 1
        openings[sums.opening_of(prompts[j], text) or "other"] += 1
    n = max(len(texts), 1)
    return {"accuracy": hits / n, "styles": {k: v / n for k, v in styles.items()},
            "openings": {k: v / n for k, v in openings.items()}}
