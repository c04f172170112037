"""LoRA students on mlx, through mlx-lm's tuner (linear_to_lora_layers, LoRALinear).

The adapters are mlx-lm's (float32 A and B, the same names, fuse, save), but the layer's
forward is our own (`branch_in_base_dtype`): mlx-lm's LoRALinear computes the branch in
float32 and casts it down, keeping a float32 (tokens, out) product and its scaled copy
alive for the backward, 12 bytes per output feature and token beside a bfloat16 base. Here
A and scale * B are cast to the input's dtype first, so the branch is two products in the
base's dtype and the step keeps 4 bytes per output feature and token (bfloat16). With a
float32 base nothing is cast and the layer equals mlx-lm's up to where the scale is
applied (tests/test_mlx_lora_branch.py).

Mirrors `hpd.backends.torch.lora` function for function. Adapters cross this module as numpy
pairs A (r, in), B (out, r) keyed by the layer's full name (model.layers.0.self_attn.q_proj),
which is also the name transformers gives the layer; mlx-lm holds them transposed.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from hpd.models.lora import Attached, LoraSpec, block_linear_names, initial_a, layer_prefix, resolve_targets

_LINEAR = (nn.Linear, nn.QuantizedLinear)


def branch_in_base_dtype(layer, x):
    """A LoRA layer's forward with the low-rank branch in x's dtype: y + (x A) (scale B)."""
    y = layer.linear(x)
    a = layer.lora_a.astype(x.dtype)
    b = (layer.scale * layer.lora_b).astype(x.dtype)
    return y + (layer.dropout(x) @ a) @ b


_BASE_DTYPE_CLASS = None


def base_dtype_class():
    """mlx-lm's LoRALinear with `branch_in_base_dtype` as its forward (built on first use, so
    that importing this module does not import mlx-lm's tuner)."""
    global _BASE_DTYPE_CLASS
    if _BASE_DTYPE_CLASS is None:
        from mlx_lm.tuner.lora import LoRALinear

        _BASE_DTYPE_CLASS = type("BaseDtypeLoRALinear", (LoRALinear,), {"__call__": branch_in_base_dtype,
                                                                       "__module__": __name__})
    return _BASE_DTYPE_CLASS


def check_supported(spec: LoraSpec, backend, path: str | None = None) -> None:
    """Everything a LoRA spec asks for runs on mlx (quantized bases included)."""


def linear_names(model) -> list[str]:
    """Full names of the linear layers inside the decoder blocks (model.layers for every
    mlx-lm family we load)."""
    return block_linear_names(model, model.layers, _LINEAR)


def linear_names_at(path: str) -> list[str]:
    """The same names from a model folder, without reading its weights."""
    from mlx_lm.utils import load_model

    from hpd.backends.mlx.loading import resolve_model_path  # mlx-lm loads lazily too

    model, _ = load_model(resolve_model_path(path), lazy=True)
    return linear_names(model)


def apply(model, spec: LoraSpec, *, seed: int, base: dict, gradient_checkpointing: bool = False) -> None:
    """Freeze `model` and put mlx-lm LoRA layers on the spec's targets, A drawn from the seed."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    names = resolve_targets(linear_names(model), spec.targets)
    prefix = layer_prefix(model, model.layers) + "."
    keys = sorted({n[len(prefix):].split(".", 1)[1] for n in names})  # relative to a block
    model.freeze()
    linear_to_lora_layers(model, len(model.layers),
                          {"rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout, "keys": keys})
    modules = dict(model.named_modules())
    own = base_dtype_class()
    for name in names:
        layer = modules[name]
        layer.__class__ = own  # the same module and weights; only the forward differs
        layer.lora_a = mx.array(initial_a(seed, name, spec.rank, layer.lora_a.shape[0]).T)
        layer.lora_b = mx.zeros_like(layer.lora_b)
    mx.eval(model.trainable_parameters())
    if gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    model.hpd_lora = Attached(spec=spec, base=base, layers=len(model.layers), modules=names)


def enable_checkpointing(model) -> None:
    """mlx-lm's helper: the blocks recompute their activations in the backward pass. The helper
    patches a block's class; this model's blocks get a class of their own first, so that other
    models of the family in the process (the teacher) are left as they are."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    layers = model.layers
    own = type(type(layers[0]).__name__, (type(layers[0]),), {"hpd_checkpointed": True})
    for layer in layers:
        if not getattr(layer, "hpd_checkpointed", False):
            layer.__class__ = own
    grad_checkpoint(layers[0])


def _lora_layers(model):
    from mlx_lm.tuner.lora import LoRALinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapters(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name, m in _lora_layers(model):
        mx.eval(m.lora_a, m.lora_b)
        out[name] = (np.array(m.lora_a.astype(mx.float32)).T, np.array(m.lora_b.astype(mx.float32)).T)
    return out


def set_adapters(model, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    layers = dict(_lora_layers(model))
    if sorted(layers) != sorted(arrays):
        raise ValueError(f"the adapters cover {len(arrays)} layers, the model has {len(layers)} LoRA layers")
    for name, (a, b) in arrays.items():
        layers[name].lora_a = mx.array(np.ascontiguousarray(a.T))
        layers[name].lora_b = mx.array(np.ascontiguousarray(b.T))
    mx.eval(model.trainable_parameters())


def counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; a quantized weight counts as its unpacked size. mlx-lm's
    total counts leaf modules only, which leaves out the adapters (a LoRA layer is no leaf)."""
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, get_total_parameters(model) + trainable


def save_merged(model, tokenizer, folder, backend, quantized: bool = False) -> None:
    """Export the student with the adapters folded into dense weights (quantized layers
    dequantized), then put the training modules back: the model in memory is unchanged.

    With `quantized`, a QLoRA student is written as mlx-lm's fuse writes it: each adapted
    layer dequantized, the update added and quantized again at its own bits and group size,
    the other quantized layers as they are, and config.json's `quantization` saying how."""
    lora = dict(_lora_layers(model))
    originals, fused = [], []
    for name, m in model.named_modules():
        if name in lora:
            originals.append((name, m))
            fused.append((name, m.fuse(dequantize=not quantized)))
        elif (not quantized and isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
              and name.rsplit(".", 1)[0] not in lora):
            originals.append((name, m))
            fused.append((name, _dequantized(m)))
    model.update_modules(tree_unflatten(fused))
    try:
        backend.save_model(model, tokenizer, folder)
        if quantized:
            _write_quantization(folder, model)
    finally:
        model.update_modules(tree_unflatten(originals))


def merged_weights(model) -> dict[str, mx.array]:
    """The student's dense weights under the checkpoint's names: each LoRA layer fused
    (its quantized base dequantized), each other quantized layer dequantized; the model is
    left as it is."""
    lora = dict(_lora_layers(model))
    dense = {}
    for name, m in model.named_modules():
        if name in lora:
            dense[name] = m.fuse(dequantize=True)
        elif isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and name.rsplit(".", 1)[0] not in lora:
            dense[name] = _dequantized(m)
    out = {key: value for key, value in tree_flatten(model.parameters())
           if not any(key.startswith(name + ".") for name in dense)}
    for name, m in dense.items():
        out.update({f"{name}.{key}": value for key, value in tree_flatten(m.parameters())})
    return out


def _write_quantization(folder, model) -> None:
    """config.json's `quantization` as mlx-lm reads it: the most common (bits, group size) at
    the top, and an entry for each layer that differs or stays full precision. mlx-lm also
    writes it as `quantization_config`."""
    import json
    from collections import Counter
    from pathlib import Path

    quantized, plain = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            quantized[name] = {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            plain.append(name)
    if not quantized:
        raise ValueError("--export-quantized: the student has no quantized layer")
    common = Counter(json.dumps(q, sort_keys=True) for q in quantized.values()).most_common(1)[0][0]
    entry = dict(json.loads(common))
    entry.update({name: q for name, q in quantized.items() if json.dumps(q, sort_keys=True) != common})
    entry.update({name: False for name in plain})
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["quantization"] = config["quantization_config"] = entry
    path.write_text(json.dumps(config, indent=4) + "\n")


def _dequantized(m):
    weight = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits, mode=m.mode)
    if isinstance(m, nn.QuantizedEmbedding):
        out = nn.Embedding(*weight.shape)
    else:
        out = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in m)
        if "bias" in m:
            out.bias = m.bias
    out.weight = weight
    return out
