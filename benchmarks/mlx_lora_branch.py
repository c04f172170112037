"""Peak memory of an mlx LoRA step: hpd's branch in the base's dtype against mlx-lm's LoRALinear.

A random Llama student (mlx-lm's own model class) in bfloat16 with LoRA on every linear
layer of its blocks, as hpd.backends.mlx.lora.apply puts it; one step of
value_and_grad(cross-entropy) on one batch, its peak (mx.get_peak_memory after
reset_peak_memory, over the memory already in use) measured twice in one process: with
hpd's layer, then with every adapted layer switched back to mlx-lm's LoRALinear (the same
weights). The difference is printed beside what hpd.models.memory.block_activations
plans for it, and the same for float32 (where the two layers keep the same arrays).

    python -m benchmarks.mlx_lora_branch
    (2 cores, mlx[cpu] 0.32.4: bfloat16 62.8 / 81.0 MiB, ratio 0.775, 18.2 MiB saved, as planned;
    float32 92.6 / 97.6 MiB, 4.9 MiB saved, none planned)
    python -m benchmarks.mlx_lora_branch --hidden 1024 --layers 4 --tokens 1024 --rank 16
"""

from __future__ import annotations

import argparse


def measure(dtype_name: str, args) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    from hpd.backends.mlx import lora
    from mlx_lm.models import llama
    from mlx_lm.tuner.lora import LoRALinear

    from hpd.models.lora import LoraSpec

    dtype = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}[dtype_name]
    margs = llama.ModelArgs(model_type="llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
                            intermediate_size=args.hidden * 11 // 4, num_attention_heads=args.hidden // 64,
                            num_key_value_heads=max(1, args.hidden // 256), rms_norm_eps=1e-5,
                            vocab_size=args.vocab, tie_word_embeddings=False)
    mx.random.seed(0)
    model = llama.Model(margs)
    model.set_dtype(dtype)
    lora.apply(model, LoraSpec(rank=args.rank, alpha=2.0 * args.rank), seed=0, base={})
    adapted = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    for m in adapted:  # trained adapters: B nonzero
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.01
    ids = mx.random.randint(0, args.vocab, (1, args.tokens + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    def loss(params):
        model.update(params)
        return nn.losses.cross_entropy(model(x).astype(mx.float32), y).mean()

    step = mx.value_and_grad(loss)
    peaks = {}
    for name, cls in (("hpd", lora.base_dtype_class()), ("mlx-lm", LoRALinear)):
        for m in adapted:
            m.__class__ = cls
        params = model.trainable_parameters()
        mx.eval(params, x, y)
        mx.eval(step(params))  # once untimed, so that both measure a warm step
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(step(params))
        peaks[name] = mx.get_peak_memory() - before
    return peaks


def planned(dtype_bytes: int, args) -> tuple[int, int]:
    """(hpd's layer, mlx-lm's layer): the plan's LoRA share of every block's activations."""
    from hpd.models.memory import Shape, block_activations

    shape = Shape.from_config({"hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4,
                               "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
                               "num_key_value_heads": max(1, args.hidden // 256), "vocab_size": args.vocab,
                               "tie_word_embeddings": False})

    def lora_share(backend):
        with_lora = block_activations(shape, args.tokens, dtype_bytes, args.rank, backend=backend)
        return (with_lora - block_activations(shape, args.tokens, dtype_bytes)) * args.layers

    # torch's (and mlx-lm's) branch: float32 products; hpd's mlx layer below float32
    return lora_share("mlx"), lora_share("torch")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    args = ap.parse_args(argv)
    print(f"Llama student hidden {args.hidden}, {args.layers} blocks, vocab {args.vocab}, LoRA rank {args.rank} "
          f"on every linear layer of the blocks, one step on {args.tokens} tokens")
    print(f"{'dtype':<9} {'hpd peak':>10} {'mlx-lm peak':>12} {'ratio':>6} {'saved':>9} {'plan saves':>11}")
    for name in args.dtypes:
        peaks = measure(name, args)
        ours, theirs = planned({"bfloat16": 2, "float16": 2, "float32": 4}[name], args)
        mib = 2 ** 20
        print(f"{name:<9} {peaks['hpd'] / mib:>6.1f} MiB {peaks['mlx-lm'] / mib:>8.1f} MiB "
              f"{peaks['hpd'] / peaks['mlx-lm']:>6.3f} {(peaks['mlx-lm'] - peaks['hpd']) / mib:>5.1f} MiB "
              f"{(theirs - ours) / mib:>7.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
