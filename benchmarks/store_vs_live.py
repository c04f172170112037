"""How good is a top-k teacher store? Store against live teacher on the embedded tiny task.

    python -m benchmarks.store_vs_live [--ks 8 32 128] [--steps 150] [--seeds 0 1]
        [--methods fkl hpd] [--backend torch] [--logprob-bits 16] [--out runs/store-vs-live]

1. Loss agreement: for every method, the relative difference between the loss (and the
   gradients w.r.t. the student's hidden states and head) computed from the store and
   from the live teacher, on the held-out data.
2. Training outcome: students trained from the store and with the live teacher, at
   equal steps, per seed: held-out exact match, token-level KL to the teacher, wall time.
3. Step time: median seconds per optimizer step, store runs against live runs. The runs
   alternate (live, store, live, ...) in one process, so machine load hits both alike;
   only the ratio is meaningful.

Writes OUT/results.md (and prints it).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the hpd command does: spinning threads distort timings

import argparse  # noqa: E402
import json
import statistics
import time
from pathlib import Path

import numpy as np

import hpd
from benchmarks._common import read_metrics
from hpd.train.config import DistillConfig
from tests.chunked_grads import loss_and_grads

ALL_METHODS = ["sft", "fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "akl", "todi", "hpd"]


def make_store(backend, teacher, tok, data: str, out: Path, k: int, max_length: int, bits: int) -> Path:
    from hpd.teachers.cache import CacheOptions, cache_teacher

    if not (out / "index.json").exists() or not json.loads((out / "index.json").read_text()).get("complete"):
        cache_teacher(backend, teacher, tok, data, out,
                      CacheOptions(top_k=k, max_length=max_length, batch_size=64, logprob_bits=bits, overwrite=True,
                                   progress=False),
                      teacher_name=DistillConfig.from_recipe("tiny").teacher)
    return out


def loss_agreement(backend, teacher, student, tok, held: str, stores: dict, max_length: int) -> list[dict]:
    """Relative loss and gradient differences, store vs live, per method and k, summed over held-out batches."""
    from hpd.data.batches import Batches, load_dataset
    from hpd.data.examples import pad_id_of
    from hpd.objectives.teacher import LiveTeacher
    from hpd.teachers.store import Store
    from hpd.teachers.stored import StoreTeacher, batch_rows

    data = load_dataset(held, tok, max_length)
    batches = Batches(data, 32, pad_id_of(tok), seed=0)
    micro = [next(batches) for _ in range(min(4, batches.batches_per_epoch))]
    opened = {k: Store(path) for k, path in stores.items()}
    rng = np.random.default_rng(0)
    rows = []
    cases = []
    for mb in micro:
        arrays = backend.to_arrays(mb)
        t_out = backend.forward(teacher, arrays, hidden=True)
        s_out = backend.forward(student, arrays, hidden=True)
        head = getattr(s_out.head, "weight", s_out.head)
        sampled = backend.to_arrays({"s": rng.integers(0, head.shape[0], size=mb["targets"].shape)})["s"]
        sources = {"live": LiveTeacher(t_out.hidden, t_out.head)}
        for k, store in opened.items():
            sources[k] = StoreTeacher(backend.to_arrays(batch_rows(store, mb)), vocab=store.vocab,
                                      temperature=store.temperature)
        cases.append((arrays["targets"], s_out.hidden, head, sampled, sources))
    for method in ALL_METHODS:
        results = {}
        for name in ["live", *opened]:
            loss, gh, gw = 0.0, [], []
            for targets, hidden, head, sampled, sources in cases:
                value, a, b = loss_and_grads(backend.name, method, hidden, head, targets, sources[name], sampled)
                loss, gh, gw = loss + value, gh + [a.ravel()], gw + [b.ravel()]
            results[name] = (loss, np.concatenate(gh), np.concatenate(gw))
        live = results["live"]
        for k in opened:
            got = results[k]
            rows.append({"method": method, "k": k,
                         "loss_rel": abs(got[0] - live[0]) / max(abs(live[0]), 1e-12),
                         "grad_hidden_rel": float(np.linalg.norm(got[1] - live[1]) / max(np.linalg.norm(live[1]), 1e-12)),
                         "grad_head_rel": float(np.linalg.norm(got[2] - live[2]) / max(np.linalg.norm(live[2]), 1e-12))})
    return rows


def train(args, method: str, seed: int, out: Path, store: Path | None) -> dict:
    from hpd.report.evaluate import accuracy, likelihood

    base = DistillConfig.from_recipe("tiny")
    over = {**base.to_dict(), "method": method, "seed": seed, "out": str(out), "overwrite": True,
            "backend": args.backend, "progress": False, "steps": args.steps, "eval_data": "", "eval_every": 0,
            "eval_generate": 0, "save_every": 0}
    if store is not None:
        over.update(teacher="", teacher_cache=str(store))
    cfg = DistillConfig.from_dict(over)
    started = time.perf_counter()
    result = hpd.distill(cfg)
    seconds = time.perf_counter() - started
    backend, student, tok = result["backend"], result["student"], result["tokenizer"]
    teacher = backend.load_model(base.teacher, trainable=False)
    acc = accuracy(backend, student, tok, base.eval_data, limit=args.eval_rows, progress=False)
    lik = likelihood(backend, student, tok, base.eval_data, teacher=teacher)
    steps = read_metrics(out)
    step_s = [r["tokens"] / r["tokens_per_s"] for r in steps if "tokens_per_s" in r]
    return {"accuracy": acc["accuracy"], "kl": lik["kl_to_teacher"], "seconds": seconds,
            "step_s": statistics.median(step_s[len(step_s) // 5:])}  # past the first steps' warm-up


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=["fkl", "hpd"])
    p.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    p.add_argument("--logprob-bits", type=int, default=16, choices=[8, 16, 32])
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--out", default="runs/store-vs-live")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from hpd.backends import get_backend

    base = DistillConfig.from_recipe("tiny")
    backend = get_backend(args.backend)
    teacher = backend.load_model(base.teacher, trainable=False, dtype="float32")
    student = backend.load_model(base.student, trainable=True, dtype="float32")
    tok = backend.load_tokenizer(base.teacher)
    lines = [f"# Teacher store vs live teacher (tiny task, {args.backend}, {args.logprob_bits}-bit log-probs)", ""]

    held = {k: make_store(backend, teacher, tok, base.eval_data, out / f"held-k{k}", k, base.max_length,
                          args.logprob_bits) for k in args.ks}
    from hpd.teachers.store import Store

    lines += ["## Store size", "", "| k | bytes/position (held-out store on disk, incl. headers and offsets) |",
              "|---|---|"]
    for k, path in held.items():
        s = Store(path)
        lines.append(f"| {k} | {s.bytes_on_disk() / s.index['positions']:.1f} |")
    agreement = loss_agreement(backend, teacher, student, tok, base.eval_data, held, base.max_length)
    lines += ["", "## Loss agreement on held-out data (relative difference, store vs live)", "",
              "| method | " + " | ".join(f"k={k} loss / grad h / grad W" for k in args.ks) + " |",
              "|---|" + "---|" * len(args.ks)]
    for method in ALL_METHODS:
        cells = []
        for k in args.ks:
            r = next(r for r in agreement if r["method"] == method and r["k"] == k)
            cells.append(f"{r['loss_rel']:.2e} / {r['grad_hidden_rel']:.2e} / {r['grad_head_rel']:.2e}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if not args.skip_training:
        train_stores = {k: make_store(backend, teacher, tok, base.data, out / f"train-k{k}", k, base.max_length,
                                      args.logprob_bits) for k in args.ks}
        del teacher, student
        rows = []
        for method in args.methods:
            for seed in args.seeds:
                # alternate live and store runs so that machine load falls on both alike
                for k in [None, *args.ks]:
                    name = "live" if k is None else f"k={k}"
                    r = train(args, method, seed, out / f"{method}-{name}-s{seed}",
                              None if k is None else train_stores[k])
                    rows.append({"method": method, "seed": seed, "source": name, **r})
                    print(json.dumps(rows[-1]), flush=True)
        lines += ["", f"## Training outcome at {args.steps} steps (seeds {', '.join(map(str, args.seeds))})", "",
                  "| method | teacher | exact match per seed | KL to teacher per seed | wall s per seed | "
                  "median step s | step time vs live |", "|---|---|---|---|---|---|---|"]
        for method in args.methods:
            live_step = statistics.fmean(r["step_s"] for r in rows if r["method"] == method and r["source"] == "live")
            for name in ["live", *(f"k={k}" for k in args.ks)]:
                mine = [r for r in rows if r["method"] == method and r["source"] == name]
                step = statistics.fmean(r["step_s"] for r in mine)
                lines.append(f"| {method} | {name} | " + ", ".join(f"{r['accuracy']:.3f}" for r in mine) + " | "
                             + ", ".join(f"{r['kl']:.4f}" for r in mine) + " | "
                             + ", ".join(f"{r['seconds']:.0f}" for r in mine) + f" | {step:.4f} | "
                             + f"{step / live_step:.2f}x |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
