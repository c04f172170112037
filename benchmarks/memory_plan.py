"""Measured peak memory of one training step against hpd.models.memory's plan, on Qwen2.5 shapes.

Random-weight models with the published Qwen2.5 widths (0.5B, 1.5B, 3B, 7B; written out
below, no download) are written as sharded safetensors folders, one tensor at a time, and
loaded through hpd's own code paths (backend.load_model, hpd.models.student.load_student), as a
real checkpoint would be. `--layers 28` runs the published depth (a 7B teacher in 4 bits
and a 1.5B student fit in 24 GB; on 2 CPU cores a 128-token point takes 15-25 minutes);
the default cuts every model to 2 blocks (every width, the vocabulary and the embeddings
as published) to cover more lengths and configurations, and the plan is evaluated for the
same shape.

Each configuration runs in a fresh subprocess. One step (teacher forward, student forward
and backward, AdamW step) on 8 tokens runs first to create the optimizer state; the peak of
the second step, at the full length, is the measurement:
- mlx (CPU): mx.get_peak_memory() after mx.reset_peak_memory(), i.e. every mlx array;
- torch (CPU): VmHWM after resetting it (/proc/self/clear_refs), minus the process's RSS
  before any model was loaded (the interpreter and libraries).

    python -m benchmarks.memory_plan                    # the default table
    python -m benchmarks.memory_plan --layers 2 --lengths 32 64 --configs lora-1.5b
    python -m benchmarks.memory_plan --plan-only        # the plan at full depth, 2048 tokens
    python -m benchmarks.memory_plan --layers 28 --lengths 128 --configs qlora-1.5b qlora-1.5b-gc
    python -m benchmarks.memory_plan --from-measured    # the table of every kept measurement
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from benchmarks._common import commit, launch, parse_args, status_bytes

QWEN25 = {  # published config.json values (Qwen/Qwen2.5-*-Instruct)
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
COMMON = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
              max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
              bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"  # Debian libopenblas0-pthread

# name: (teacher, teacher bits, student, lora rank, student bits, gradient checkpointing)
CONFIGS = {
    "lora-1.5b": ("7b", 4, "1.5b", 16, 0, False),
    "qlora-1.5b": ("7b", 4, "1.5b", 16, 4, False),
    "lora-1.5b-gc": ("7b", 4, "1.5b", 16, 0, True),
    "qlora-1.5b-gc": ("7b", 4, "1.5b", 16, 4, True),
    "full-0.5b": ("1.5b", 4, "0.5b", 0, 0, False),
    # a dense teacher: the torch backend quantizes no teacher
    "lora-0.5b-dense": ("1.5b", 0, "0.5b", 16, 0, False),
    "full-0.5b-dense": ("1.5b", 0, "0.5b", 0, 0, False),
    "lora-0.5b-dense-gc": ("1.5b", 0, "0.5b", 16, 0, True),
    # QLoRA on torch: a bitsandbytes NF4 base (runs on the CPU with bitsandbytes >= 0.48)
    "qlora-0.5b-dense": ("1.5b", 0, "0.5b", 16, 4, False),
}


def qwen_config(size: str, layers: int | None = None) -> dict:
    config = {**COMMON, **QWEN25[size]}
    if layers:
        config["num_hidden_layers"] = layers
    return config


def write_model(folder: Path, config: dict, dtype: str) -> Path:
    """A random-weight Qwen2 folder (config.json, safetensors shards, a tokenizer), one tensor
    in memory at a time."""
    import mlx.core as mx

    from hpd.models.memory import Shape

    if (folder / "config.json").exists():
        _index(folder)
        return folder
    folder.mkdir(parents=True)
    s = Shape.from_config(config)
    mdtype = getattr(mx, dtype)
    tensors = {"model.embed_tokens.weight": (s.vocab, s.hidden), "model.norm.weight": (s.hidden,)}
    if not s.tied:
        tensors["lm_head.weight"] = (s.vocab, s.hidden)
    for i in range(s.layers):
        p = f"model.layers.{i}."
        for name, n_in, n_out in s.linears():
            group = "self_attn." if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp."
            tensors[p + group + name + ".weight"] = (n_out, n_in)
            if s.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
                tensors[p + group + name + ".bias"] = (n_out,)
        tensors[p + "input_layernorm.weight"] = (s.hidden,)
        tensors[p + "post_attention_layernorm.weight"] = (s.hidden,)
    for k, (name, shape) in enumerate(tensors.items()):
        if len(shape) == 1:
            value = mx.ones(shape, dtype=mdtype)
        else:
            value = (mx.random.normal(shape, key=mx.random.key(k)) * 0.02).astype(mdtype)
        mx.save_safetensors(str(folder / f"model-{k:05d}.safetensors"), {name: value}, metadata={"format": "mlx"})
        del value
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}))
    _tokenizer(folder)
    _index(folder)
    return folder


def _index(folder: Path) -> None:
    """model.safetensors.index.json, which transformers needs to find sharded weights."""
    from safetensors import safe_open

    path = folder / "model.safetensors.index.json"
    if path.exists():
        return
    weight_map = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(shard), "np") as fh:
            weight_map.update({k: shard.name for k in fh.keys()})
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(1000)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t2").save_pretrained(folder)


# ---------------------------------------------------------------------------- child
def child(cfg: dict) -> dict:
    """One configuration's step: its peak, the memory resident between steps, and the loss path."""
    import numpy as np

    from hpd.backends import get_backend
    from hpd.objectives.chunked import resolve_chunk_budget
    from hpd.models.student import load_student
    from hpd.train.config import DistillConfig
    from hpd.train.loop import objective_loss_fn
    from hpd.train.schedule_config import Objective

    args = SimpleNamespace(**cfg)
    teacher_size, t_bits, student_size, rank, s_bits, gc = CONFIGS[args.config]
    root = Path(args.root)
    teacher_dir = root / f"{teacher_size}-{args.layers}"
    student_dir = root / f"{student_size}-{args.layers}"
    if args.backend == "torch":
        _warm_torch(lora=bool(rank), quantized=bool(s_bits))
    baseline = status_bytes("VmRSS")
    cfg = DistillConfig(teacher=str(teacher_dir), student=str(student_dir), data="x", out="x",
                        backend=args.backend, lora_rank=rank, student_quantize=s_bits, teacher_quantize=t_bits,
                        gradient_checkpointing=gc, batch_size=1, max_length=args.length, dtype="float32",
                        chunk_size=args.chunk_size, lr=1e-5, method="hpd")
    backend = get_backend(args.backend, cfg)
    student = load_student(backend, cfg, None)
    teacher = backend.load_model(str(teacher_dir), trainable=False, dtype="float32", quantize=t_bits)
    optimizer = backend.make_optimizer(student, cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 1000, size=(1, args.length + 1))
    batch = {"input_ids": ids[:, :-1], "attention_mask": np.ones((1, args.length), dtype=np.int64),
             "targets": ids[:, 1:]}
    chunked = backend.chunked_blocker(student) is None and backend.chunked_blocker(teacher) is None
    peaks, resident = [], 0
    for step in range(2):
        if step == 1:
            resident = _resident(backend, baseline)
            _reset_peak(backend)
        # the first step only creates the optimizer state: a few tokens are enough
        arrays = backend.to_arrays(batch if step == 1 else {k: v[:, :8] for k, v in batch.items()})
        t_out = backend.forward(teacher, arrays, hidden=chunked)
        loss_fn = objective_loss_fn([Objective("hpd", 1.0, {})], t_out, arrays["targets"], sampled=None,
                                    num_tokens=float(args.length), temperature=1.0, chunk_size=cfg.chunk_size,
                                    chunk_budget_mb=resolve_chunk_budget(cfg.chunk_budget_mb, False))
        backend.forward_backward(student, arrays, loss_fn, hidden=chunked)
        backend.optimizer_step(student, optimizer, 1e-5, 1.0)
        del t_out, loss_fn, arrays
        peaks.append(_peak(backend, baseline))
    return {"peak": peaks[1], "resident": resident, "chunked": chunked}


def _warm_torch(lora: bool = False, quantized: bool = False) -> None:
    """Run every kind of kernel a step uses once on toy tensors, so that the library code it
    pages in (hundreds of MB of MKL and ATen; peft, bitsandbytes and the model's code when
    used) is part of the baseline, not of the model."""
    import torch
    from transformers.models.qwen2 import modeling_qwen2  # noqa: F401

    if lora:
        import peft  # noqa: F401
    if quantized:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer = layer.to("cpu")
        x = torch.randn(2, 64, requires_grad=True)
        layer(x).sum().backward()

    x = torch.randn(4, 8, 64, requires_grad=True)
    lin = torch.nn.Linear(64, 64)
    q = lin(x).view(4, 8, 4, 16).transpose(1, 2)
    y = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    z = torch.nn.functional.silu(y).sum() + torch.log_softmax(lin(x), -1).exp().sum()
    z.backward()
    opt = torch.optim.AdamW(lin.parameters())
    torch.nn.utils.clip_grad_norm_(lin.parameters(), 1.0)
    opt.step()


def _resident(backend, baseline: int) -> int:
    """Memory held between steps: weights, adapters, optimizer state. On torch, glibc keeps
    freed heap pages mapped (counted in RSS) until asked to return them: asked here."""
    if backend.name == "mlx":
        import mlx.core as mx

        return int(mx.get_active_memory())
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status_bytes("VmRSS") - baseline


def _reset_peak(backend) -> None:
    if backend.name == "mlx":
        import mlx.core as mx

        mx.clear_cache()
        mx.reset_peak_memory()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")


def _peak(backend, baseline: int) -> int:
    if backend.name == "mlx":
        import mlx.core as mx

        return int(mx.get_peak_memory())
    return status_bytes("VmHWM") - baseline


# ---------------------------------------------------------------------------- parent
def estimate(config: str, backend: str, layers: int | None, length: int, chunk_size, chunked: bool) -> int:
    from hpd.models.memory import Setting, Shape, plan

    teacher_size, t_bits, student_size, rank, s_bits, gc = CONFIGS[config]
    s = Setting(backend=backend, batch=1, length=length, student_dtype=4, teacher_dtype=4, teacher_bits=t_bits,
                student_bits=s_bits, lora_rank=rank, gradient_checkpointing=gc, chunked=chunked,
                chunk_size=chunk_size)
    parts = plan(Shape.from_config(qwen_config(teacher_size, layers)),
                 Shape.from_config(qwen_config(student_size, layers)), s)
    resident = sum(b for name, b in parts if name.endswith(("weights", "adapters (float32)"))
                   or name.startswith("optimizer"))
    return parts[-1][1], resident


def headline() -> None:
    from hpd.models.memory import Setting, Shape, format_plan

    teacher, student = Shape.from_config(qwen_config("7b")), Shape.from_config(qwen_config("1.5b"))
    cases = [("LoRA r16, bfloat16 base", dict(lora_rank=16, student_dtype=2)),
             ("LoRA r16, bfloat16 base, checkpointing", dict(lora_rank=16, student_dtype=2,
                                                            gradient_checkpointing=True)),
             ("QLoRA r16, 4-bit base", dict(lora_rank=16, student_bits=4, student_dtype=2)),
             ("QLoRA r16, 4-bit base, checkpointing", dict(lora_rank=16, student_bits=4, student_dtype=2,
                                                          gradient_checkpointing=True)),
             ("full fine-tuning, float32", dict()),
             ("full fine-tuning, float32, checkpointing", dict(gradient_checkpointing=True))]
    for name, extra in cases:
        s = Setting(backend="mlx", batch=1, length=2048, teacher_bits=4, teacher_dtype=2, **extra)
        print(f"\nQwen2.5-7B (4-bit) -> Qwen2.5-1.5B, {name}:")
        print(format_plan(teacher, student, s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["lora-1.5b", "qlora-1.5b", "lora-1.5b-gc", "full-0.5b"],
                    choices=sorted(CONFIGS))
    ap.add_argument("--backends", nargs="+", default=["mlx"], choices=["mlx", "torch"])
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks of every model (widths as published)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--chunk-size", default="auto")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "hpd-memory-plan"),
                    help="where the random models are written (reused between runs)")
    ap.add_argument("--plan-only", action="store_true", help="print the plan at full depth and exit")
    ap.add_argument("--from-measured", action="store_true",
                    help="print the table from the measurements kept in ROOT/measured.jsonl (no new runs)")
    args = parse_args(ap, None, child)
    if args is None:  # a child: it has printed its result
        return
    headline()
    if args.plan_only:
        return
    root = Path(args.root)
    if args.from_measured:
        table([json.loads(line) for line in (root / "measured.jsonl").read_text().splitlines()], args.chunk_size)
        return
    for name in args.configs:
        t, t_bits, s, *_ = CONFIGS[name]
        write_model(root / f"{t}-{args.layers}", qwen_config(t, args.layers), "bfloat16" if t_bits else "float32")
        write_model(root / f"{s}-{args.layers}", qwen_config(s, args.layers), "float32")
    print(f"\nmeasured vs planned, one training step, batch 1, {args.layers} blocks per model:")
    print(f"{'config':<14} {'backend':<7} {'tokens':>6} {'path':<8} {'measured':>12} {'planned':>12} {'error':>7}"
          f"   {'resident: measured':>18} {'planned':>10}")
    worst = 0.0
    for name in args.configs:
        for backend in args.backends:
            for length in args.lengths:
                cfg = {"config": name, "backend": backend, "length": length, "layers": args.layers,
                       "root": str(root), "chunk_size": args.chunk_size}
                env = dict(os.environ)
                if backend == "mlx" and os.path.exists(OPENBLAS):
                    # mlx[cpu] on Linux ships a reference BLAS; OpenBLAS computes the same ~20x
                    # faster. Memory is what mlx allocates either way.
                    env.update(LD_PRELOAD=OPENBLAS, OPENBLAS_NUM_THREADS="1")
                found = launch("benchmarks.memory_plan", cfg, env=env)
                if "error" in found:
                    print(f"{name:<14} {backend:<7} {length:>6} failed: {found['error']}")
                    continue
                with open(root / "measured.jsonl", "a") as fh:  # kept, to re-plan without re-measuring
                    fh.write(json.dumps({"config": name, "backend": backend, "length": length,
                                         "layers": args.layers, "commit": commit(), **found}) + "\n")
                planned, resident = estimate(name, backend, args.layers, length, args.chunk_size, found["chunked"])
                error = planned / found["peak"] - 1
                worst = max(worst, abs(error))
                print(f"{name:<14} {backend:<7} {length:>6} {'chunked' if found['chunked'] else 'plain':<8} "
                      f"{found['peak'] / 2**30:>8.3f} GiB {planned / 2**30:>8.3f} GiB {100 * error:>+6.1f}%"
                      f"   {found['resident'] / 2**30:>14.3f} GiB {resident / 2**30:>6.3f} GiB", flush=True)
    print(f"largest error: {100 * worst:.1f}%")


def table(rows: list[dict], chunk_size) -> None:
    """Measured (latest row per point) against the current plan."""
    latest = {(r["config"], r["backend"], r["length"], r["layers"]): r for r in rows}
    print(f"{'config':<16} {'backend':<7} {'blocks':>6} {'tokens':>6} {'measured':>12} {'planned':>12} {'error':>7}"
          f"   {'resident: measured':>18} {'planned':>10}")
    worst = 0.0
    for (name, backend, length, layers), r in sorted(latest.items()):
        planned, resident = estimate(name, backend, layers, length, chunk_size, r["chunked"])
        error = planned / r["peak"] - 1
        worst = max(worst, abs(error))
        print(f"{name:<16} {backend:<7} {layers:>6} {length:>6} {r['peak'] / 2**30:>8.3f} GiB "
              f"{planned / 2**30:>8.3f} GiB {100 * error:>+6.1f}%   {r.get('resident', 0) / 2**30:>14.3f} GiB "
              f"{resident / 2**30:>6.3f} GiB")
    print(f"largest error: {100 * worst:.1f}%")


if __name__ == "__main__":
    main()
