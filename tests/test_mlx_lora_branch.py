"""The mlx LoRA layer's branch in the base's dtype (hpd.backends.mlx.lora) against mlx-lm's LoRALinear.

Tolerances (relative norm of the difference, outputs and every gradient): with a float32
base the two compute the same products, the scale applied to B before the product instead
of after it: 1e-6 (measured: 0). With a half-precision base ours rounds the branch to the
base's dtype where mlx-lm rounds only the sum: bfloat16 1e-2 (measured 2e-3 to 5e-3; its
step is 2^-8 = 0.4%), float16 2e-3 (measured 3e-4 to 7e-4).
"""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
pytest.importorskip("mlx_lm")

from hpd.backends.mlx.lora import base_dtype_class  # noqa: E402


def pair(dtype, n_in=64, n_out=256, rank=8, quantized=False):
    """mlx-lm's layer and ours over the same base and adapters (B nonzero, as after training)."""
    from mlx_lm.tuner.lora import LoRALinear

    mx.random.seed(0)
    base = nn.Linear(n_in, n_out, bias=False)
    base.set_dtype(dtype)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4)
    layers = []
    for cls in (None, base_dtype_class()):
        layer = LoRALinear.from_base(base, r=rank, scale=2.0)
        mx.random.seed(1)
        layer.lora_a = mx.random.uniform(-0.1, 0.1, layer.lora_a.shape)
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
        if cls is not None:
            layer.__class__ = cls
        layer.freeze()
        layer.unfreeze(keys=["lora_a", "lora_b"])
        layers.append(layer)
    return layers


def outputs_and_grads(layer, x):
    def loss(params, x):
        layer.update(params)
        return (layer(x).astype(mx.float32) ** 2).mean()

    out = layer(x)
    _, grads = mx.value_and_grad(loss, argnums=(0, 1))(layer.trainable_parameters(), x)
    mx.eval(out, grads)
    return out.astype(mx.float32), grads


def rel(a, b) -> float:
    return (mx.linalg.norm((a - b).astype(mx.float32)) / mx.linalg.norm(b.astype(mx.float32))).item()


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-6), (mx.bfloat16, 1e-2), (mx.float16, 2e-3)])
@pytest.mark.parametrize("quantized", [False, True])
def test_equal_to_mlx_lm(dtype, tol, quantized):
    theirs, ours = pair(dtype, quantized=quantized)
    x = (mx.random.normal((4, 16, 64)) * 0.5).astype(dtype)
    (o1, (p1, x1)), (o2, (p2, x2)) = outputs_and_grads(theirs, x), outputs_and_grads(ours, x)
    assert o2.dtype == mx.float32 and ours(x).dtype == dtype
    assert rel(o2, o1) < tol
    for key in ("lora_a", "lora_b"):
        assert p2[key].dtype == mx.float32  # the adapters (and their gradients) stay float32
        assert rel(p2[key], p1[key]) < tol, key
    assert rel(x2, x1) < tol
    # and the branch matters: without it the outputs differ by far more than the tolerance
    assert rel(theirs.linear(x).astype(mx.float32), o1) > 10 * tol


def test_half_precision_branch_keeps_less():
    """One layer's step in bfloat16: mlx-lm's layer keeps a float32 (tokens, out) product and its
    scaled copy; ours keeps neither (the plan's 12 -> 4 bytes per output feature and token)."""
    peaks = []
    tokens, n_out = 256, 1024
    for layer in pair(mx.bfloat16, n_in=32, n_out=n_out):
        x = mx.random.normal((tokens, 32)).astype(mx.bfloat16)
        mx.eval(x, layer.parameters())

        def loss(params):
            layer.update(params)
            return layer(x).astype(mx.float32).sum()

        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(mx.value_and_grad(loss)(layer.trainable_parameters()))
        peaks.append(mx.get_peak_memory() - before)
    saved = (peaks[0] - peaks[1]) / (tokens * n_out)
    assert 6 <= saved <= 10, (peaks, saved)


def test_apply_uses_the_layer(tmp_path):
    """hpd's LoRA students run this layer, and it is still mlx-lm's class for fuse and export."""
    import mlx.nn as nn
    from hpd.backends.mlx import lora
    from mlx_lm.models import llama
    from mlx_lm.tuner.lora import LoRALinear

    from hpd.models.lora import LoraSpec

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=50)
    model = llama.Model(args)
    lora.apply(model, LoraSpec(rank=2, alpha=4.0), seed=0, base={})
    layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert layers and all(type(m) is base_dtype_class() for m in layers)
    assert isinstance(layers[0].fuse(), nn.Linear)
