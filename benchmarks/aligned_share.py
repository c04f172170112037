"""The share of student targets paired with a teacher position (`cross/aligned`), by the
two tokenizers' conventions and templates, on the corpora of the pairing's property test.

    python -m benchmarks.aligned_share [--rows 100] [--seed 0] [--no-uld]

The tokenizers, templates and rows are tests/tokenizer_zoo.py's: two byte-level BPEs
(vocabularies 400 and 800), a SentencePiece-style BPE with byte fallback and single digits,
a Unigram with byte fallback; random chat and prompt/completion rows. Prints, per ordered
pair (student <- teacher), the share paired with each template case (the same template on
both sides, or the student's and the teacher's), then for each pair the unpaired targets
by what they are (digits, a word, whitespace, ...) and why (the teacher has no cut at the
text read before them, or its next token there is another one); and, unless --no-uld, how
much teacher signal ULD's term (`--uld-weight`) carries at unpaired targets: the change of
its gradient when the teacher's logits change, there and at paired targets.
Run from the repository root; CPU only, about a minute of CPU time at the default 100 rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from hpd.data.examples import encode_row
from hpd.teachers.cross import teacher_ids_of
from hpd.teachers.pairing import Speller, pair_row, segments
from tests.tokenizer_zoo import KINDS, convention, make_tokenizer, random_rows

CASES = [("chatml", "chatml"), ("tagged", "tagged"), ("plain", "plain"),
         ("tagged", "chatml"), ("chatml", "plain"), ("plain", "tagged")]  # (student's, teacher's) template


def kind_of(token: bytes | None) -> str:
    """What a target token is, by its bytes (None: a special)."""
    if token is None:
        return "end token"
    text = token.decode("utf-8", errors="replace").strip(" ")
    if not text.strip():
        return "whitespace"
    if text.isdigit():
        return "digits"
    if text.isascii() and text.isalpha():
        return "word"
    if not token.isascii():
        return "non-ASCII"
    return "punctuation"


def unpaired(row, student, teacher, spellers, paired: set[int]) -> Counter:
    """(what, why) of each unpaired student target in the row. Why: 'no teacher cut' when no
    teacher token boundary in the response has the same text before it (the target sits
    inside a teacher token), else 'teacher's next token differs'."""
    s_ex, t_ex = encode_row(row, student), encode_row(row, teacher)
    ids, t_ids = s_ex.input_ids, t_ex.input_ids
    sp, tp = spellers
    out = Counter()
    for (a, b), (c, d) in zip(segments(s_ex.loss_mask), segments(t_ex.loss_mask)):
        cuts = {tp.spell(t_ids[c:j]).lstrip(): j for j in range(c, d)}
        for i in range(max(a, 1), b):
            if i in paired:
                continue
            j = cuts.get(sp.spell(ids[a:i]).lstrip())
            why = "no teacher cut" if j is None else "teacher's next token differs"
            out[kind_of(sp.bytes[ids[i]]), why] += 1
    return out


def measure(s_kind: str, t_kind: str, rows: list[dict]) -> dict:
    """Shares per template case and the unpaired targets' kinds, over all cases."""
    shares, reasons = {}, Counter()
    for s_tpl, t_tpl in CASES:
        student, teacher = make_tokenizer(s_kind, s_tpl), make_tokenizer(t_kind, t_tpl)
        spellers, ids_of = (Speller(student), Speller(teacher)), teacher_ids_of(student, teacher)
        targets = paired = 0
        for row in rows:
            p = pair_row(row, student, teacher, spellers, ids_of, 4096)
            targets, paired = targets + p.targets, paired + len(p.student_pos)
            reasons += unpaired(row, student, teacher, spellers, set(p.student_pos.tolist()))
        shares[s_tpl, t_tpl] = (paired, targets)
    return {"shares": shares, "unpaired": reasons}


def uld_signal(s_kind: str, t_kind: str, rows: list[dict], batch: int = 8) -> dict[str, float]:
    """The largest change of ULD's gradient (on the student's logits) when the teacher's
    logits are drawn anew, at paired and at unpaired targets."""
    import torch

    import hpd
    from hpd.data.batches import collate, load_dataset
    from hpd.objectives.teacher import LogitsTeacher
    from hpd.teachers.cross import CrossTeacher, prepare, teacher_batch

    student, teacher = make_tokenizer(s_kind, "chatml"), make_tokenizer(t_kind, "chatml")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[:batch]))
        data = prepare([(path, {})], student, teacher, 4096)
        b = collate(load_dataset(path, student, 4096).examples, student.pad_token_id)
    t = teacher_batch(data, b, teacher.pad_token_id)
    v_s, v_t = len(student), len(teacher)
    gather = torch.as_tensor(np.where(data.teacher_id_of >= 0, data.teacher_id_of, v_t))
    y = torch.as_tensor(b["targets"]).reshape(1, -1)
    where = torch.as_tensor(t["where"])
    gen = torch.Generator().manual_seed(0)
    zs = torch.randn(1, y.shape[1], v_s, generator=gen, dtype=torch.float64)
    grads = []
    for _ in range(2):
        zt = 3 * torch.randn(t["input_ids"].size, v_t, generator=gen, dtype=torch.float64)
        x = zs.clone().requires_grad_(True)
        source = CrossTeacher(LogitsTeacher(zt), where, gather, y, vocab=v_s, teacher_vocab=v_t, identical=False)
        value, _ = hpd.loss("uld", x, source, y)
        value.backward()
        grads.append(x.grad[0])
    change = (grads[0] - grads[1]).abs().amax(-1)
    active = y[0] != -100
    return {"paired": float(change[active & (where >= 0)].max()), "unpaired": float(change[active & (where < 0)].max()),
            "unpaired_targets": int((active & (where < 0)).sum()), "targets": int(active.sum())}


def report(found: dict, rows: int, seed: int) -> None:
    print(f"cross/aligned: % of student targets paired, on {rows} random rows (seed {seed}), by template "
          "(one name: both sides; student's|teacher's)")
    heads = [s if s == t else f"{s}|{t}" for s, t in CASES]
    print(f"{'student <- teacher':<20}" + "".join(f"{h:>14}" for h in heads) + f"{'all':>8}")
    by_convention: dict[tuple[str, str], list[int]] = {}
    for (s, t), r in found.items():
        cells = [100 * p / max(n, 1) for p, n in r["shares"].values()]
        paired, targets = (sum(x[i] for x in r["shares"].values()) for i in (0, 1))
        print(f"{s + ' <- ' + t:<20}" + "".join(f"{c:14.1f}" for c in cells) + f"{100 * paired / targets:8.1f}")
        tally = by_convention.setdefault((convention(s), convention(t)), [0, 0])
        tally[0], tally[1] = tally[0] + paired, tally[1] + targets

    print("\nby convention (student <- teacher), all templates")
    for (s, t), (paired, targets) in by_convention.items():
        print(f"{s + ' <- ' + t:<40}{100 * paired / targets:6.1f}")

    print("\nunpaired targets, % of all targets (all templates): what (why)")
    for (s, t), r in found.items():
        n = sum(n for _, n in r["shares"].values())
        top = ", ".join(f"{what} ({why}) {100 * c / n:.1f}" for (what, why), c in r["unpaired"].most_common(4))
        print(f"{s + ' <- ' + t:<20}{top}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100, help="random rows per template case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-uld", action="store_true", help="skip the ULD check (it needs torch)")
    args = ap.parse_args(argv)
    rows = random_rows(args.rows, args.seed)
    pairs = [(s, t) for s in KINDS for t in KINDS if s != t]
    report({p: measure(*p, rows) for p in pairs}, args.rows, args.seed)
    if not args.no_uld:
        print("\nULD's gradient on the student's logits: its largest change when the teacher's logits are drawn "
              "anew (chatml, 8 rows)")
        for s, t in pairs:
            u = uld_signal(s, t, rows)
            print(f"{s + ' <- ' + t:<20}paired {u['paired']:.1e}, unpaired {u['unpaired']:.1e} "
                  f"({u['unpaired_targets']} of {u['targets']} targets unpaired)")


if __name__ == "__main__":
    main()
