"""Build the shipped sums teacher, student, tokenizer and data in hpd/assets/sums.

    .venv/bin/python scripts/make_sums_models.py [--out DIR] [--teacher-steps N] [--student-steps N]

The task and why it looks the way it does: docs/when-hpd-helps.md. Everything is made
here, offline and seeded, on CPU with 2 threads:

1. problems from hpd.tasks.sums, split so that no held-out list of numbers is trained on;
2. a byte-level BPE tokenizer trained on the task text (the tiny models' recipe);
3. the teacher, trained from scratch on answers written forward (45%), backward (45%) and
   in pairs (10%): it writes two styles and can read the third;
4. the student, a model about 8x smaller, trained briefly on all three styles in equal
   parts on other problems, so that it starts weak;
5. the distillation data train.jsonl (pairs style, the teacher's minor style), held.jsonl
   (the held-out prompts, pairs style) and held_teacher.jsonl (the teacher's own sampled
   answers to them, for token-level KL on the teacher's text);
6. measured on the saved weights and written into each model card and manifest.json:
   greedy and sampled (T=1) held-out exact match, the share of each style among greedy and
   sampled answers, the mean probability of each style's full answer, and the mlx-lm vs
   transformers logits check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import make_tiny_models as common  # noqa: E402  (tokenizer, config, training and export helpers)

from hpd.tasks import sums  # noqa: E402
from hpd.tasks.sums_models import generate_texts, score, style_probabilities  # noqa: E402
from hpd.tasks.tiny import encode_example  # noqa: E402

SEED = 0
DIFFICULTY = dict(sums.DEFAULTS)
TEACHER_MIX = {"forward": 0.45, "backward": 0.45, "pairs": 0.10}
STUDENT_MIX = {"forward": 1 / 3, "backward": 1 / 3, "pairs": 1 / 3}
N_POOL = 24000  # teacher training problems
N_STUDENT = 4000  # student pre-training problems (a separate slice)
N_TRAIN_SHIPPED = 3000  # distillation prompts (the first of the teacher's pool), pairs style
N_HELD = 200
EVAL_FIRST = 50  # the tests re-measure the teacher's greedy accuracy on the first rows of held.jsonl
SAMPLES = 4  # sampled answers per held-out prompt for pass@1 at T=1
MAX_NEW_TOKENS = 96

TEACHER = dict(
    arch=dict(hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4),
    train=dict(steps=1200, batch_size=64, lr=2e-3, warmup=60, weight_decay=0.01, seed=SEED + 1),
)
STUDENT = dict(
    arch=dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
    train=dict(steps=300, batch_size=64, lr=2e-3, warmup=30, weight_decay=0.01, seed=SEED + 2),
)

log = common.log


def measure(model, tok, held, seed: int) -> dict:
    prompts = [p.prompt() for p in held]
    refs = [p.completion("pairs") for p in held]
    greedy = score(prompts, refs, generate_texts(model, tok, prompts, max_new_tokens=MAX_NEW_TOKENS))
    torch.manual_seed(seed)
    sampled = score(prompts, refs, generate_texts(model, tok, prompts, greedy=False, samples=SAMPLES,
                                                  max_new_tokens=MAX_NEW_TOKENS), samples=SAMPLES)
    first = score(prompts[:EVAL_FIRST], refs[:EVAL_FIRST],
                  generate_texts(model, tok, prompts[:EVAL_FIRST], max_new_tokens=MAX_NEW_TOKENS))
    probs = style_probabilities(model, tok, held[:100])
    return {"greedy_accuracy": greedy["accuracy"], f"greedy_accuracy_first{EVAL_FIRST}": first["accuracy"],
            "sampled_accuracy": sampled["accuracy"], "greedy_styles": greedy["styles"],
            "sampled_styles": sampled["styles"], "style_probability_first100": probs}


def pct(d: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items())


def model_card(name, spec, n_params, size_mb, info, m, vocab, data_note) -> str:
    a, t = spec["arch"], {**spec["train"], **info}
    return f"""# hpd sums {name}

The {name} of hpd's sums task (docs/when-hpd-helps.md). Made offline by
`scripts/make_sums_models.py` (seed {SEED}); nothing was downloaded.

- Architecture: `LlamaForCausalLM`, {a['num_hidden_layers']} layers, hidden {a['hidden_size']},
  {a['num_attention_heads']} heads, MLP {a['intermediate_size']}, tied embeddings, {common.MAX_POSITIONS} positions.
- Parameters: {n_params:,} ({size_mb:.2f} MB of float32 safetensors).
- Tokenizer: byte-level BPE with single digits, {vocab} tokens; `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3.
- Training: from scratch, AdamW (lr {t['lr']}, warmup {t['warmup']} then cosine to 10%), {t['steps']} steps
  of batch {t['batch_size']}, torch seed {t['seed']}, final training loss {t['final_loss']}.
- Data: {data_note}.

## Held-out ({N_HELD} prompts of `held.jsonl`)

- greedy exact match: **{m['greedy_accuracy']:.3f}** (first {EVAL_FIRST} rows: {m[f'greedy_accuracy_first{EVAL_FIRST}']:.3f})
- sampled exact match, T=1, {SAMPLES} samples per prompt: **{m['sampled_accuracy']:.3f}**
- style of the greedy answers: {pct(m['greedy_styles'])}
- style of the sampled answers: {pct(m['sampled_styles'])}
- mean probability of each style's full correct answer (first 100 prompts): {pct(m['style_probability_first100'])}

For demos, tests and benchmarks only; it knows nothing beyond this task.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "hpd" / "assets" / "sums")
    parser.add_argument("--teacher-steps", type=int, default=TEACHER["train"]["steps"])
    parser.add_argument("--student-steps", type=int, default=STUDENT["train"]["steps"])
    parser.add_argument("--models", default="teacher,student",
                        help="which models to (re)build; the other is kept as it is in --out")
    parser.add_argument("--probe", action="store_true", help="print held-out greedy accuracy every 100 steps")
    args = parser.parse_args()
    wanted = set(args.models.split(","))
    if not wanted or not wanted <= {"teacher", "student"}:
        parser.error(f"--models: a comma-separated subset of teacher,student, not {args.models!r}")
    if "teacher" not in wanted and not (args.out / "teacher" / "config.json").is_file():
        parser.error(f"--models {args.models}: no teacher in {args.out} to keep")
    TEACHER["train"]["steps"] = args.teacher_steps
    STUDENT["train"]["steps"] = args.student_steps

    t_start = time.time()
    torch.set_num_threads(2)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    random.seed(SEED)
    torch.manual_seed(SEED)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # 1. problems and styles
    pool, held = sums.make_split(SEED, N_POOL + N_STUDENT, N_HELD, **DIFFICULTY)
    teacher_pool, student_pool = pool[:N_POOL], pool[N_POOL:]
    style_rng = random.Random(SEED + 10)
    teacher_rows = [p.row(sums.pick_style(style_rng, TEACHER_MIX)) for p in teacher_pool]
    student_rows = [p.row(sums.pick_style(style_rng, STUDENT_MIX)) for p in student_pool]
    sums.write_jsonl([p.row("pairs") for p in teacher_pool[:N_TRAIN_SHIPPED]], out / "train.jsonl")
    sums.write_jsonl([p.row("pairs") for p in held], out / "held.jsonl")
    log(f"data: {len(teacher_rows)} teacher, {len(student_rows)} student problems, {len(held)} held out")

    # 2. tokenizer (every style's text, so that none is tokenized worse than another)
    tok_dir = out / "_tokenizer"
    texts = [p.prompt() + c for p in teacher_pool[:4000] for c in p.completions().values()]
    tok = common.build_tokenizer(texts, tok_dir)
    lengths = {s: [len(tok.encode(p.completion(s).rsplit("Answer", 1)[0], add_special_tokens=False))
                   for p in held] for s in sums.STYLES}
    seq = [len(encode_example(tok, r["prompt"], r["completion"])[0]) for r in teacher_rows[:2000]]
    log(f"tokenizer: {len(tok)} tokens; working before the answer, min tokens per style "
        f"{ {s: min(v) for s, v in lengths.items()} }; sequence length max {max(seq)}")

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    manifest_path = out / "manifest.json"
    summary = {"seed": SEED, "difficulty": DIFFICULTY, "teacher_mix": TEACHER_MIX, "student_mix": STUDENT_MIX,
               "vocab_size": len(tok), "n_teacher_pool": N_POOL, "n_student_pool": N_STUDENT,
               "n_train_shipped": N_TRAIN_SHIPPED, "n_held": N_HELD, "eval_first": EVAL_FIRST,
               "samples": SAMPLES, "max_new_tokens": MAX_NEW_TOKENS,
               "min_working_tokens": {s: min(v) for s, v in lengths.items()}, "models": {}}
    if wanted != {"teacher", "student"} and manifest_path.is_file():
        summary["models"] = json.loads(manifest_path.read_text())["models"]
    specs = [
        ("teacher", TEACHER, teacher_rows, f"{N_POOL} problems answered forward / backward / in pairs "
         f"({TEACHER_MIX['forward']:.0%} / {TEACHER_MIX['backward']:.0%} / {TEACHER_MIX['pairs']:.0%}); "
         f"the first {N_TRAIN_SHIPPED} are the prompts of `train.jsonl`"),
        ("student", STUDENT, student_rows, f"{N_STUDENT} other problems, a third in each style, briefly, "
         "so that it starts weak (its greedy answers all open with the forward shape `a: N`)"),
    ]
    for name, spec, rows, data_note in specs:
        if name not in wanted:
            continue
        torch.manual_seed(spec["train"]["seed"])
        model = LlamaForCausalLM(common.make_config(tok, spec["arch"]))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{name}: {n_params:,} parameters, training {spec['train']['steps']} steps")
        examples = [encode_example(tok, r["prompt"], r["completion"]) for r in rows]
        probe = None
        if args.probe:
            def probe(m):
                prompts = [p.prompt() for p in held[:100]]
                r = score(prompts, [p.completion("pairs") for p in held[:100]],
                          generate_texts(m, tok, prompts, max_new_tokens=MAX_NEW_TOKENS))
                log(f"  {name} greedy held-out (first 100): {r['accuracy']:.2f} styles {pct(r['styles'])}")
        info = common.train(model, examples, tok.pad_token_id, name=name, probe=probe, **spec["train"])
        model_dir = out / name
        common.save_model(model, tok, model_dir)
        size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
        loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        loaded_tok = AutoTokenizer.from_pretrained(model_dir)
        m = measure(loaded, loaded_tok, held, seed=SEED + 20)
        diff = common.check_exports(model_dir, [p.row("forward") for p in held[:16]])
        log(f"{name}: greedy {m['greedy_accuracy']:.3f}, sampled {m['sampled_accuracy']:.3f}; "
            f"greedy styles {pct(m['greedy_styles'])}; style probabilities {pct(m['style_probability_first100'])}; "
            f"mlx-lm vs transformers logits max abs diff {diff:.2e}; {size_mb:.2f} MB")
        (model_dir / "README.md").write_text(model_card(name, spec, n_params, size_mb, info, m, len(tok), data_note))
        summary["models"][name] = {"arch": spec["arch"], "params": n_params, "size_mb": round(size_mb, 3),
                                   "train": {**spec["train"], **info}, **m, "mlx_logits_max_abs_diff": diff}
        if name == "teacher":
            torch.manual_seed(SEED + 30)
            prompts = [p.prompt() for p in held]
            answers = generate_texts(loaded, loaded_tok, prompts, greedy=False, max_new_tokens=MAX_NEW_TOKENS)
            sums.write_jsonl([{"prompt": p, "completion": a} for p, a in zip(prompts, answers)],
                             out / "held_teacher.jsonl")
    shutil.rmtree(tok_dir)
    manifest_path.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {time.time() - t_start:.0f}s: {out}")


if __name__ == "__main__":
    main()
