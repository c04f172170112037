"""Build the embedded tiny teacher, student, tokenizer and data in hpd/assets/tiny.

    python scripts/make_tiny_models.py [--out DIR]

Everything is made here, offline and seeded, on CPU with 2 threads (a few minutes):

1. arithmetic word problems from hpd.tasks.arith: train.jsonl and held.jsonl
   (held-out problems never share their arithmetic with training problems);
2. a byte-level BPE tokenizer (digits split one by one) trained on the training text,
   saved as a PreTrainedTokenizerFast with bos/eos/pad/unk and a chat template;
3. a tiny LlamaForCausalLM teacher trained from scratch with AdamW;
4. a smaller student, trained briefly so that it is clearly worse than the teacher;
5. checks: both folders load in transformers and mlx-lm, tokenizer ids agree,
   logits agree; greedy held-out exact match is measured on the saved weights and
   written into each model card and manifest.json.

Sequence format: [bos] + prompt ids + completion ids + [eos], loss on completion + eos.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

# On a small shared machine, OpenMP threads that spin while waiting make torch ~10x slower
# as soon as another process wants a core; passive waiting costs little when alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpd.tasks import arith  # noqa: E402
from hpd.tasks.tiny import IGNORE_INDEX, encode_example, greedy_accuracy  # noqa: E402

SEED = 0
DIFFICULTY = dict(arith.DEFAULTS)
N_POOL = 20000  # distinct training problems the teacher learns from
N_TRAIN_SHIPPED = 4000  # of them, shipped as train.jsonl (the distillation prompts)
N_HELD = 200
VOCAB_SIZE = 384  # upper bound; the BPE stops earlier when merges run out
MAX_POSITIONS = 128
EVAL_FIRST = 40  # the tests re-measure the teacher on the first rows of held.jsonl

TEACHER = dict(
    arch=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    train=dict(steps=900, batch_size=64, lr=2e-3, warmup=60, weight_decay=0.01, seed=SEED + 1),
)
STUDENT = dict(
    arch=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2),
    train=dict(steps=520, batch_size=64, lr=2e-3, warmup=30, weight_decay=0.01, seed=SEED + 2),
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(texts, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
    )
    tok.chat_template = CHAT_TEMPLATE
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    save_tokenizer(tok, out_dir)
    return tok


def save_tokenizer(tok, out_dir: Path) -> None:
    tok.save_pretrained(out_dir)
    # Portable class name and an inline chat template, for older transformers too.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------- models


def make_config(tok, arch: dict):
    from transformers import LlamaConfig

    heads = arch["num_attention_heads"]
    return LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=MAX_POSITIONS,
        num_key_value_heads=heads,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **arch,
    )


def batches(examples, batch_size: int, steps: int, seed: int, pad_id: int):
    """`steps` padded batches, reshuffling the examples every epoch."""
    rng = random.Random(seed)
    order: list = []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, i in enumerate(idx):
            x, y = examples[i]
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        yield ids, labels, mask


def train(model, examples, pad_id: int, steps, batch_size, lr, warmup, weight_decay, seed, name, probe=None):
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.time()
    running = None
    for step, (ids, labels, mask) in enumerate(batches(examples, batch_size, steps, seed, pad_id)):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"{name} step {step + 1}/{steps} loss {running:.4f} ({time.time() - t0:.0f}s)")
            if probe is not None:
                probe(model)
                model.train()
    model.eval()
    return {"steps": steps, "final_loss": round(running, 4), "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------- export and checks


def save_model(model, tok, out_dir: Path) -> None:
    from transformers import GenerationConfig

    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    # mlx-lm reads a top-level rope_theta (transformers 5 keeps it in rope_parameters only).
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    ).save_pretrained(out_dir)
    save_tokenizer(tok, out_dir)


def check_exports(model_dir: Path, rows) -> float:
    """Loads in transformers and mlx-lm, same token ids, logits max abs diff (returned)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [r["prompt"] + r["completion"] for r in rows]
    hf_ids = [hf_tok.encode(t, add_special_tokens=False) for t in texts]
    for t, ids in zip(texts, hf_ids):
        assert hf_tok.decode(ids) == t, "tokenizer does not round-trip"
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError as e:
        log(f"  mlx not available ({e}); skipping the mlx-lm checks")
        return float("nan")
    mlx_model, mlx_tok = mlx_lm.load(str(model_dir))
    mlx_ids = [mlx_tok.encode(t, add_special_tokens=False) for t in texts]
    assert mlx_ids == hf_ids, "mlx-lm and transformers tokenize differently"
    assert mlx_tok.bos_token_id == hf_tok.bos_token_id and mlx_tok.eos_token_id == hf_tok.eos_token_id
    worst = 0.0
    for ids in hf_ids[:8]:
        seq = [hf_tok.bos_token_id] + ids + [hf_tok.eos_token_id]
        with torch.no_grad():
            ref = hf_model(input_ids=torch.tensor([seq])).logits[0].numpy()
        got = mlx_model(mx.array([seq]))[0]
        got = __import__("numpy").array(got.astype(mx.float32))
        worst = max(worst, float(abs(ref - got).max()))
    return worst


def model_card(name, role, arch, n_params, size_mb, train_info, acc, acc_first, vocab, other) -> str:
    a = arch
    return f"""# hpd tiny {name}

The {role} of hpd's embedded arithmetic demo. Made offline by
`scripts/make_tiny_models.py` (seed {SEED}); nothing was downloaded.

- Architecture: `LlamaForCausalLM`, {a['num_hidden_layers']} layers, hidden {a['hidden_size']},
  {a['num_attention_heads']} heads (head dim {a['hidden_size'] // a['num_attention_heads']}),
  MLP {a['intermediate_size']}, tied embeddings, RoPE theta 10000, {MAX_POSITIONS} positions.
- Parameters: {n_params:,} ({size_mb:.2f} MB of float32 safetensors).
- Tokenizer: byte-level BPE with single digits, {vocab} tokens, trained on the task text;
  `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3.
- Training: from scratch, AdamW (lr {train_info['lr']}, betas 0.9/0.98, weight decay
  {train_info['weight_decay']}, warmup {train_info['warmup']} then cosine to 10%),
  {train_info['steps']} steps of batch {train_info['batch_size']}, torch seed {train_info['seed']},
  final training loss {train_info['final_loss']} ({train_info['seconds']:.0f} s on 2 CPU threads).
- Data: {other}.
- Sequence format: `[bos] + prompt + completion + [eos]`; loss on the completion and eos.

## Held-out exact match

Greedy decoding from `[bos] + prompt` until eos (at most 64 new tokens), answer taken from
the last `Answer: N` line, measured on these saved weights:

- all {N_HELD} rows of `held.jsonl`: **{acc:.3f}**
- first {EVAL_FIRST} rows: {acc_first:.3f}

For demos and tests only; it knows nothing beyond this task.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "hpd" / "assets" / "tiny")
    parser.add_argument("--teacher-steps", type=int, default=TEACHER["train"]["steps"])
    parser.add_argument("--student-steps", type=int, default=STUDENT["train"]["steps"])
    parser.add_argument("--models", default="teacher,student",
                        help="which models to (re)build; the others are kept as they are in --out")
    parser.add_argument("--probe", action="store_true",
                        help="print held-out accuracy (first 100 rows) every 100 steps, for tuning")
    args = parser.parse_args()
    TEACHER["train"]["steps"] = args.teacher_steps
    STUDENT["train"]["steps"] = args.student_steps

    t_start = time.time()
    torch.set_num_threads(2)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    random.seed(SEED)
    torch.manual_seed(SEED)
    out: Path = args.out
    wanted = set(args.models.split(","))
    if not wanted or not wanted <= {"teacher", "student"}:
        parser.error(f"--models: a comma-separated subset of teacher,student, not {args.models!r}")
    if wanted != {"teacher", "student"} and not (out / "manifest.json").is_file():
        parser.error(f"--models {args.models}: no earlier {out / 'manifest.json'} to keep the other model from")
    out.mkdir(parents=True, exist_ok=True)

    # 1. data
    pool, held = arith.make_split(SEED, N_POOL, N_HELD, **DIFFICULTY)
    shipped = pool[:N_TRAIN_SHIPPED]
    arith.write_jsonl(shipped, out / "train.jsonl")
    arith.write_jsonl(held, out / "held.jsonl")
    log(f"data: {len(pool)} training problems ({len(shipped)} shipped), {len(held)} held out")

    # 2. tokenizer
    tok_dir = out / "_tokenizer"
    tok = build_tokenizer([r["prompt"] + r["completion"] for r in pool], tok_dir)
    examples = [encode_example(tok, r["prompt"], r["completion"]) for r in pool]
    lengths = [len(x) for x, _ in examples]
    log(f"tokenizer: {len(tok)} tokens; sequence length max {max(lengths)}, mean {sum(lengths) / len(lengths):.1f}")

    from transformers import LlamaForCausalLM

    summary = {"seed": SEED, "difficulty": DIFFICULTY, "vocab_size": len(tok), "n_train_pool": N_POOL,
               "n_train_shipped": N_TRAIN_SHIPPED, "n_held": N_HELD, "eval_first": EVAL_FIRST, "models": {}}
    specs = [
        ("teacher", TEACHER, pool, f"{N_POOL} distinct training problems (the first {N_TRAIN_SHIPPED} are `train.jsonl`)"),
        ("student", STUDENT, shipped, f"the {N_TRAIN_SHIPPED} problems of `train.jsonl`, briefly, so that distillation has room to help"),
    ]
    if wanted != {"teacher", "student"}:
        summary["models"] = json.loads((out / "manifest.json").read_text())["models"]
    for name, spec, rows, data_note in specs:
        if name not in wanted:
            continue
        torch.manual_seed(spec["train"]["seed"])
        model = LlamaForCausalLM(make_config(tok, spec["arch"]))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{name}: {n_params:,} parameters, training {spec['train']['steps']} steps")
        ex = [encode_example(tok, r["prompt"], r["completion"]) for r in rows]
        probe = None
        if args.probe:
            def probe(m):
                log(f"  {name} held-out exact match (first 100): {greedy_accuracy(m, tok, held[:100]):.2f}")
        info = train(model, ex, tok.pad_token_id, name=name, probe=probe, **spec["train"])
        model_dir = out / name
        save_model(model, tok, model_dir)
        size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6

        # measure on the saved weights
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        loaded_tok = AutoTokenizer.from_pretrained(model_dir)
        acc = greedy_accuracy(loaded, loaded_tok, held)
        acc_first = greedy_accuracy(loaded, loaded_tok, held[:EVAL_FIRST])
        diff = check_exports(model_dir, held[:32])
        log(f"{name}: held-out exact match {acc:.3f} (first {EVAL_FIRST}: {acc_first:.3f}); "
            f"mlx-lm vs transformers logits max abs diff {diff:.2e}; {size_mb:.2f} MB")
        (model_dir / "README.md").write_text(
            model_card(name, name, spec["arch"], n_params, size_mb, {**spec["train"], **info}, acc, acc_first,
                       len(tok), data_note)
        )
        summary["models"][name] = {
            "arch": spec["arch"], "params": n_params, "size_mb": round(size_mb, 3),
            "train": {**spec["train"], **info}, "held_accuracy": acc,
            f"held_accuracy_first{EVAL_FIRST}": acc_first, "mlx_logits_max_abs_diff": diff,
        }
    shutil.rmtree(tok_dir)
    (out / "manifest.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {time.time() - t_start:.0f}s: {out}")


if __name__ == "__main__":
    main()
