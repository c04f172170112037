"""One maker for the shipped models in hpd/assets: a task's data, its tokenizer, a teacher
and a student trained from scratch, measured on their saved weights, each with a model card
and a manifest. The tasks (scripts.model_tasks) say what differs; everything here is offline,
seeded, on CPU with 2 threads.

Sequence format: [bos] + prompt ids + completion ids + [eos], loss on completion + eos.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# On a small shared machine, OpenMP threads that spin while waiting make torch ~10x slower
# as soon as another process wants a core; passive waiting costs little when alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from hpd.tasks.tiny import IGNORE_INDEX, encode_example  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 384  # upper bound; the BPE stops earlier when merges run out
MAX_POSITIONS = 128
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
)


@dataclass
class Prepared:
    """A task's data, written to the output folder, and what its models are trained and measured on."""

    tokenizer: Any
    rows: dict  # model name -> its training rows ({"prompt", "completion"}, optionally "given")
    notes: dict  # model name -> the model card's line on its data
    summary: dict  # the manifest's fields before "models"
    held: Any  # what `Task.measure` and `Task.probe` read
    scratch: Path | None = None  # removed at the end (a tokenizer's training folder)


@dataclass
class Task:
    """What one set of shipped models is: the models' shapes and training, and the task's parts."""

    name: str
    out: Path  # the default output folder
    specs: dict  # model name ("teacher", "student", ...) -> {"arch": {...}, "train": {...}}, built in this order
    prepare: Callable[[Path], Prepared]
    measure: Callable[[str, Any, Any, Prepared], dict]  # (name, model, tok, prepared) on the saved weights
    describe: Callable[[dict], str]  # the log line of what `measure` found
    card: Callable[..., str]  # (name, spec, n_params, size_mb, info, measured, vocab, note) -> README.md
    export_rows: Callable[[Prepared], list]  # rows for the mlx-lm vs transformers check
    probe: Callable[[Any, Any, Prepared], str]  # --probe: a short held-out score during training
    finish: Callable[[str, Any, Any, Prepared, Path], None] = lambda *a: None  # after a model is saved
    extra_args: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    apply_args: Callable[[Any, dict], None] = lambda args, specs: None
    seed: int = 0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(texts, out_dir: Path):
    """A byte-level BPE with digits split one by one, trained on `texts`, with bos/eos/pad/unk and
    a chat template, saved to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", model_max_length=MAX_POSITIONS)
    tok.chat_template = CHAT_TEMPLATE
    if [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] != [0, 1, 2, 3]:
        raise RuntimeError(f"special token ids {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}"
                           f", expected (0, 1, 2, 3) for {SPECIALS}: the tokenizers library changed their order")
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

    return LlamaConfig(vocab_size=len(tok), max_position_embeddings=MAX_POSITIONS,
                       num_key_value_heads=arch["num_attention_heads"], hidden_act="silu", rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
                       attention_bias=False, mlp_bias=False, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **arch)


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


def encode(tok, row: dict):
    """(input_ids, labels) of a row. The first `given` tokens of a row's completion carry no loss:
    a start of the answer handed to the model, as the prompt is, which it learns to continue."""
    ids, labels = encode_example(tok, row["prompt"], row["completion"])
    given = row.get("given", 0)
    if given:
        first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
        labels = labels[:first] + [IGNORE_INDEX] * given + labels[first + given:]
    return ids, labels


def train(model, examples, pad_id: int, steps, batch_size, lr, warmup, weight_decay, seed, name, probe=None):
    """AdamW (betas 0.9/0.98, no decay on norms), linear warmup then cosine to 10%, clipping at 1."""
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))

    def lr_at(step):
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
                log(f"  {name} {probe(model)}")
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
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     do_sample=False, max_new_tokens=64).save_pretrained(out_dir)
    save_tokenizer(tok, out_dir)


def check_exports(model_dir: Path, rows) -> float:
    """Loads in transformers and mlx-lm, same token ids, logits max abs diff (returned)."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [r["prompt"] + r["completion"] for r in rows]
    hf_ids = [hf_tok.encode(t, add_special_tokens=False) for t in texts]
    for t, ids in zip(texts, hf_ids):
        if hf_tok.decode(ids) != t:
            raise RuntimeError(f"{model_dir}: the tokenizer does not round-trip {t!r}")
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError as e:
        log(f"  mlx not available ({e}); skipping the mlx-lm checks")
        return float("nan")
    mlx_model, mlx_tok = mlx_lm.load(str(model_dir))
    if [mlx_tok.encode(t, add_special_tokens=False) for t in texts] != hf_ids:
        raise RuntimeError(f"{model_dir}: mlx-lm and transformers tokenize differently")
    if (mlx_tok.bos_token_id, mlx_tok.eos_token_id) != (hf_tok.bos_token_id, hf_tok.eos_token_id):
        raise RuntimeError(f"{model_dir}: mlx-lm and transformers disagree on bos/eos ids")
    worst = 0.0
    for ids in hf_ids[:8]:
        seq = [hf_tok.bos_token_id] + ids + [hf_tok.eos_token_id]
        with torch.no_grad():
            ref = hf_model(input_ids=torch.tensor([seq])).logits[0].numpy()
        got = np.array(mlx_model(mx.array([seq]))[0].astype(mx.float32))
        worst = max(worst, float(abs(ref - got).max()))
    return worst


# ---------------------------------------------------------------- the maker


def build_model(task: Task, name: str, spec: dict, prepared: Prepared, out: Path, probe: bool) -> dict:
    """Train one model from scratch, save it, measure it on its saved weights and write its card;
    its entry in the manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = prepared.tokenizer
    torch.manual_seed(spec["train"]["seed"])
    model = LlamaForCausalLM(make_config(tok, spec["arch"]))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{name}: {n_params:,} parameters, training {spec['train']['steps']} steps")
    examples = [encode(tok, r) for r in prepared.rows[name]]
    probe_fn = (lambda m: task.probe(m, tok, prepared)) if probe else None
    info = train(model, examples, tok.pad_token_id, name=name, probe=probe_fn, **spec["train"])
    model_dir = out / name
    save_model(model, tok, model_dir)
    size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded_tok = AutoTokenizer.from_pretrained(model_dir)
    measured = task.measure(name, loaded, loaded_tok, prepared)
    diff = check_exports(model_dir, task.export_rows(prepared))
    log(f"{name}: {task.describe(measured)}; mlx-lm vs transformers logits max abs diff {diff:.2e}; {size_mb:.2f} MB")
    trained = {**spec["train"], **info}
    (model_dir / "README.md").write_text(task.card(name, spec, n_params, size_mb, trained, measured, len(tok),
                                                   prepared.notes[name]))
    task.finish(name, loaded, loaded_tok, prepared, out)
    return {"arch": spec["arch"], "params": n_params, "size_mb": round(size_mb, 3), "train": trained, **measured,
            "mlx_logits_max_abs_diff": diff}


def make(task: Task, specs: dict, out: Path, wanted: set, probe: bool = False) -> dict:
    """The task's data and tokenizer in `out`, then the `wanted` models; the others keep their
    folders and manifest entries. Returns the manifest."""
    from transformers.utils import logging as hf_logging

    started = time.time()
    torch.set_num_threads(2)
    hf_logging.disable_progress_bar()
    random.seed(task.seed)
    torch.manual_seed(task.seed)
    out.mkdir(parents=True, exist_ok=True)
    prepared = task.prepare(out)
    summary = {**prepared.summary, "models": {}}
    if wanted != set(specs):
        summary["models"] = json.loads((out / "manifest.json").read_text())["models"]
    for name in specs:
        if name in wanted:
            summary["models"][name] = build_model(task, name, specs[name], prepared, out, probe)
    if prepared.scratch is not None:
        shutil.rmtree(prepared.scratch)
    (out / "manifest.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {time.time() - started:.0f}s: {out}")
    return summary


def main(task: Task, argv=None, description: str = "") -> None:
    """The command line of one task's entry point (scripts.make_*_models)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    shown = task.out.relative_to(REPO) if task.out.is_relative_to(REPO) else task.out
    parser.add_argument("--out", type=Path, default=task.out, help=f"output folder (default: {shown})")
    names = list(task.specs)
    for name in names:
        steps = task.specs[name]["train"]["steps"]
        parser.add_argument(f"--{name}-steps", type=int, default=steps, help=f"training steps (default: {steps})")
    parser.add_argument("--models", default=",".join(names),
                        help=f"which of {','.join(names)} to (re)build; the others are kept as they are in --out")
    parser.add_argument("--probe", action="store_true",
                        help="print a held-out score (first 100 rows) every 100 steps, for tuning")
    task.extra_args(parser)
    args = parser.parse_args(argv)
    wanted = set(args.models.split(","))
    if not wanted or not wanted <= set(names):
        parser.error(f"--models: a comma-separated subset of {','.join(names)}, not {args.models!r}")
    kept = [name for name in names if name not in wanted]
    missing = [str(p) for p in (args.out / "manifest.json", *(args.out / k / "config.json" for k in kept))
               if kept and not p.is_file()]
    if missing:
        parser.error(f"--models {args.models}: the others are kept from {args.out}, which lacks "
                     f"{', '.join(missing)}; build every model there first")
    specs = copy.deepcopy(task.specs)
    for name in names:
        specs[name]["train"]["steps"] = getattr(args, f"{name}_steps")
    task.apply_args(args, specs)
    make(task, specs, args.out, wanted, args.probe)
