"""Build the shipped four-number sums teacher, student and data in hpd/assets/sums4.

    python scripts/make_sums4_models.py [--out DIR] [--models teacher,student] [--teacher-steps N]
                                        [--student-steps N] [--student-arch HIDDEN,MLP,LAYERS,HEADS]

The task and why it looks the way it does: hpd/tasks/sums4.py and docs/evidence.md.
Offline and seeded, on CPU with 2 threads:

1. problems from hpd.tasks.sums4: a training pool, validation and test sets that share no
   list of numbers;
2. the tokenizer of the sums assets (the same characters; nothing to retrain);
3. the teacher, trained from scratch on answers written forward (45%), backward (45%) and
   in pairs (10%): it writes two styles and reads the third;
4. the raw student, about a third of the teacher's size, trained briefly on other problems
   in all three styles, so that it starts weak but knows the shapes;
5. train.jsonl (the distillation data: pairs style), train_teacher.jsonl (the teacher's own
   sampled answers to the same prompts, a control), val.jsonl, test.jsonl and
   test_teacher.jsonl (the teacher's sampled answers to the test prompts, for KL on its text);
6. greedy and sampled test exact match, the styles of the answers and the probability of
   each style's full answer, measured on the saved weights and written into the model
   cards and manifest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import make_tiny_models as common  # noqa: E402  (config, training and export helpers)

from hpd.tasks import sums, sums4  # noqa: E402
from hpd.tasks.sums_models import generate_texts, score, style_probabilities  # noqa: E402
from hpd.tasks.tiny import encode_example  # noqa: E402

SEED = 0
N_TEACHER_POOL = 4000  # teacher training problems; the first N_DATA are the distillation prompts
N_STUDENT_POOL = 1000  # the raw student's brief start (a separate slice)
N_DATA = 2000
N_VAL, N_TEST = 150, 300
SAMPLES = 4  # sampled answers per test prompt, T=1
SAMPLE_ROWS = 100
MAX_NEW_TOKENS = 48  # the longest answer is 42 tokens

TEACHER = dict(
    arch=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
    train=dict(steps=800, batch_size=64, lr=2e-3, warmup=50, weight_decay=0.01, seed=SEED + 1),
)
STUDENT = dict(
    arch=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2),
    train=dict(steps=400, batch_size=64, lr=2e-3, warmup=20, weight_decay=0.01, seed=SEED + 2),
)

log = common.log


def measure(model, tok, test) -> dict:
    prompts = [p.prompt() for p in test]
    refs = [p.completion("pairs") for p in test]
    greedy = score(prompts, refs, generate_texts(model, tok, prompts, max_new_tokens=MAX_NEW_TOKENS))
    torch.manual_seed(SEED + 20)
    rows = SAMPLE_ROWS
    sampled = score(prompts[:rows], refs[:rows], generate_texts(
        model, tok, prompts[:rows], greedy=False, samples=SAMPLES, max_new_tokens=MAX_NEW_TOKENS), samples=SAMPLES)
    probs = style_probabilities(model, tok, test[:50])
    return {"greedy_accuracy": greedy["accuracy"], "sampled_accuracy": sampled["accuracy"],
            "greedy_styles": greedy["styles"], "greedy_openings": greedy["openings"],
            "sampled_styles": sampled["styles"], "style_probability_first50": probs}


def pct(d: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items())


def model_card(name, spec, n_params, size_mb, info, m, vocab, data_note) -> str:
    a, t = spec["arch"], {**spec["train"], **info}
    return f"""# hpd sums4 {name}

The {name} of hpd's four-number sums task (hpd/tasks/sums4.py, docs/evidence.md). Made
offline by `scripts/make_sums4_models.py` (seed {SEED}); nothing was downloaded.

- Architecture: `LlamaForCausalLM`, {a['num_hidden_layers']} layers, hidden {a['hidden_size']},
  {a['num_attention_heads']} heads, MLP {a['intermediate_size']}, tied embeddings, {common.MAX_POSITIONS} positions.
- Parameters: {n_params:,} ({size_mb:.2f} MB of float32 safetensors).
- Tokenizer: the sums tokenizer (byte-level BPE with single digits), {vocab} tokens.
- Training: from scratch, AdamW (lr {t['lr']}, warmup {t['warmup']} then cosine to 10%), {t['steps']} steps
  of batch {t['batch_size']}, torch seed {t['seed']}, final training loss {t['final_loss']}.
- Data: {data_note}.

## Test set ({N_TEST} prompts of `test.jsonl`)

- greedy exact match: **{m['greedy_accuracy']:.3f}**
- sampled exact match, T=1, {SAMPLES} samples on each of the first {SAMPLE_ROWS} prompts: **{m['sampled_accuracy']:.3f}**
- style of the greedy answers: {pct(m['greedy_styles'])}
- first line of the greedy answers: {pct(m['greedy_openings'])}
- style of the sampled answers: {pct(m['sampled_styles'])}
- mean probability of each style's full correct answer (first 50 prompts): {pct(m['style_probability_first50'])}

For demos, tests and benchmarks only; it knows nothing beyond this task.
"""


def teacher_answers(model, tok, problems, seed: int) -> list:
    torch.manual_seed(seed)
    prompts = [p.prompt() for p in problems]
    texts = generate_texts(model, tok, prompts, greedy=False, max_new_tokens=MAX_NEW_TOKENS)
    return [{"prompt": p, "completion": t} for p, t in zip(prompts, texts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=sums4.SUMS4_DIR)
    parser.add_argument("--models", default="teacher,student",
                        help="which models to (re)build; the other is kept as it is in --out")
    parser.add_argument("--teacher-steps", type=int, default=TEACHER["train"]["steps"])
    parser.add_argument("--student-steps", type=int, default=STUDENT["train"]["steps"])
    parser.add_argument("--student-arch", default="", metavar="HIDDEN,MLP,LAYERS,HEADS",
                        help="another student shape (for sizing the student; the default is the shipped one)")
    parser.add_argument("--probe", action="store_true", help="print test greedy accuracy every 100 steps")
    args = parser.parse_args()
    wanted = set(args.models.split(","))
    if not wanted or not wanted <= {"teacher", "student"}:
        parser.error(f"--models: a comma-separated subset of teacher,student, not {args.models!r}")
    if "teacher" not in wanted and not (args.out / "teacher" / "config.json").is_file():
        parser.error(f"--models {args.models}: no teacher in {args.out} to keep")
    TEACHER["train"]["steps"] = args.teacher_steps
    STUDENT["train"]["steps"] = args.student_steps
    if args.student_arch:
        h, i, n, heads = (int(v) for v in args.student_arch.split(","))
        STUDENT["arch"] = dict(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads)

    t_start = time.time()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    random.seed(SEED)
    torch.manual_seed(SEED)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # 1. problems and styles
    pool, val, test = sums4.make_splits(SEED, N_TEACHER_POOL + N_STUDENT_POOL, N_VAL, N_TEST)
    teacher_pool, student_pool = pool[:N_TEACHER_POOL], pool[N_TEACHER_POOL:]
    style_rng = random.Random(SEED + 10)
    teacher_rows = [p.row(sums.pick_style(style_rng, sums4.TEACHER_MIX)) for p in teacher_pool]
    student_rows = [p.row(sums.pick_style(style_rng, sums4.STUDENT_MIX)) for p in student_pool]
    data = teacher_pool[:N_DATA]
    for split, problems in (("train", data), ("val", val), ("test", test)):
        sums.write_jsonl([p.row("pairs") for p in problems], out / sums4.SPLITS[split])
    log(f"data: {len(teacher_rows)} teacher, {len(student_rows)} student problems; {N_DATA} distillation rows, "
        f"{len(val)} validation, {len(test)} test")

    # 2. tokenizer: the sums one
    tok = AutoTokenizer.from_pretrained(REPO / "hpd" / "assets" / "sums" / "teacher")
    lengths = {s: [len(tok.encode(p.completion(s), add_special_tokens=False)) for p in test] for s in sums.STYLES}
    working = {s: min(len(tok.encode(p.completion(s).rsplit("Answer", 1)[0], add_special_tokens=False))
                      for p in test) for s in sums.STYLES}
    log(f"tokenizer: {len(tok)} tokens; answer tokens per style "
        f"{ {s: (min(v), max(v)) for s, v in lengths.items()} }; working before the answer, min {working}")

    manifest_path = out / "manifest.json"
    summary = {"seed": SEED, "difficulty": sums4.DIFFICULTY, "teacher_mix": sums4.TEACHER_MIX,
               "student_mix": sums4.STUDENT_MIX, "vocab_size": len(tok), "n_teacher_pool": N_TEACHER_POOL,
               "n_student_pool": N_STUDENT_POOL, "n_data": N_DATA, "n_val": N_VAL, "n_test": N_TEST,
               "samples": SAMPLES, "sample_rows": SAMPLE_ROWS, "max_new_tokens": MAX_NEW_TOKENS,
               "answer_tokens": {s: [min(v), max(v)] for s, v in lengths.items()},
               "min_working_tokens": working, "models": {}}
    if wanted != {"teacher", "student"} and manifest_path.is_file():
        summary["models"] = json.loads(manifest_path.read_text())["models"]
    specs = [
        ("teacher", TEACHER, teacher_rows, f"{N_TEACHER_POOL} problems answered forward / backward / in pairs "
         f"({sums4.TEACHER_MIX['forward']:.0%} / {sums4.TEACHER_MIX['backward']:.0%} / "
         f"{sums4.TEACHER_MIX['pairs']:.0%}); the first {N_DATA} are the prompts of `train.jsonl`"),
        ("student", STUDENT, student_rows, f"{N_STUDENT_POOL} other problems, a third in each style, briefly, "
         "so that it starts weak but knows the shapes"),
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
                prompts = [p.prompt() for p in test[:100]]
                r = score(prompts, [p.completion("pairs") for p in test[:100]],
                          generate_texts(m, tok, prompts, max_new_tokens=MAX_NEW_TOKENS))
                log(f"  {name} greedy test (first 100): {r['accuracy']:.2f} styles {pct(r['styles'])}")
        info = common.train(model, examples, tok.pad_token_id, name=name, probe=probe, **spec["train"])
        model_dir = out / name
        common.save_model(model, tok, model_dir)
        size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
        loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        loaded_tok = AutoTokenizer.from_pretrained(model_dir)
        m = measure(loaded, loaded_tok, test)
        diff = common.check_exports(model_dir, [p.row("forward") for p in test[:16]])
        log(f"{name}: greedy {m['greedy_accuracy']:.3f}, sampled {m['sampled_accuracy']:.3f}; "
            f"greedy styles {pct(m['greedy_styles'])}; style probabilities {pct(m['style_probability_first50'])}; "
            f"mlx-lm vs transformers logits max abs diff {diff:.2e}; {size_mb:.2f} MB")
        (model_dir / "README.md").write_text(model_card(name, spec, n_params, size_mb, info, m, len(tok), data_note))
        summary["models"][name] = {"arch": spec["arch"], "params": n_params, "size_mb": round(size_mb, 3),
                                   "train": {**spec["train"], **info}, **m, "mlx_logits_max_abs_diff": diff}
        if name == "teacher":
            sums.write_jsonl(teacher_answers(loaded, loaded_tok, test, SEED + 30), out / sums4.SPLITS["test_teacher"])
            sums.write_jsonl(teacher_answers(loaded, loaded_tok, data, SEED + 31), out / sums4.SPLITS["train_teacher"])
    manifest_path.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {time.time() - t_start:.0f}s: {out}")


if __name__ == "__main__":
    main()
