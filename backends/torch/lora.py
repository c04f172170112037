"""LoRA students on torch, through peft (the optional `lora` extra, imported only here).

Mirrors `hpd.backends.mlx.lora` function for function. Adapters cross this module as numpy
pairs A (r, in), B (out, r) keyed by the layer's full name in the transformers model
(model.layers.0.self_attn.q_proj), which is also the name mlx-lm gives the layer.
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import torch

from hpd.models.lora import Attached, LoraSpec, block_linear_names, initial_a, resolve_targets

_ADAPTER = "default"
_BNB_BLOCK = 64  # bitsandbytes' 4-bit block size


def _peft():
    try:
        import peft
    except ImportError:
        raise ValueError("LoRA on the torch backend needs peft: pip install 'hpd-distill[lora]' "
                         "(or use --backend mlx, whose LoRA comes with mlx-lm)") from None
    return peft


def check_supported(spec: LoraSpec, backend, path: str | None = None) -> None:
    """Fail before loading anything when the spec cannot run here: peft, a single process, and
    for a quantized base, bitsandbytes layers that run on this device and fit the model's widths."""
    _peft()
    if backend.world_size > 1:
        # the adapters would need their own DDP/FSDP wrapping to keep ranks in sync
        raise ValueError("LoRA students on the torch backend run in a single process; under torchrun "
                         "train the whole student, or use --backend mlx with mlx.launch")
    if spec.quantize:
        _check_bitsandbytes(spec.quantize, backend.device)
        if path is not None and backend.device.type != "cuda" and spec.quantize == 4:
            _check_widths_for_cpu(path)


def _bitsandbytes_alternative(bits: int) -> str:
    return f"use --backend mlx --student-quantize {bits} (mlx-lm quantization), or drop --student-quantize"


def _check_bitsandbytes(bits: int, device: torch.device) -> None:
    """bitsandbytes imports, and one of its `bits`-bit layers runs forward and backward on
    `device` (CUDA always; the CPU from the releases with CPU kernels)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError(f"--student-quantize {bits} on the torch backend needs bitsandbytes: "
                         f"pip install 'hpd-distill[qlora]'; or {_bitsandbytes_alternative(bits)}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = _quantized_linear(bnb, bits, torch.randn(64, 64) * 0.02).to(device)
            x = torch.randn(2, 64, device=device, requires_grad=True)
            layer(x).sum().backward()
    except Exception as exc:  # noqa: BLE001 - any failure means: not on this device
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--student-quantize {bits}: bitsandbytes {bnb.__version__} cannot run {bits}-bit "
                         f"layers on {device.type} ({first}); {_bitsandbytes_alternative(bits)}") from None


def _quantized_linear(bnb, bits: int, weight: torch.Tensor):
    n_out, n_in = weight.shape
    if bits == 4:
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    return layer


def _check_widths_for_cpu(path: str) -> None:
    """bitsandbytes' CPU 4-bit matmul packs each output row in blocks of 64 inputs."""
    narrow = sorted({m.in_features for m in _skeleton(path).modules()
                     if isinstance(m, torch.nn.Linear) and m.in_features % _BNB_BLOCK})
    if narrow:
        raise ValueError(f"--student-quantize 4 on the CPU: bitsandbytes' CPU kernels need every linear "
                         f"layer's input width to be a multiple of {_BNB_BLOCK}; this model has "
                         f"{', '.join(map(str, narrow))}. Use --student-quantize 8, or "
                         f"{_bitsandbytes_alternative(4)}")


def linear_names(model) -> list[str]:
    """Full names of the linear layers inside the decoder blocks (dense or bitsandbytes)."""
    linear = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    return block_linear_names(model, model.get_decoder().layers, linear)


def _skeleton(path: str):
    """The model of a folder on the meta device: its modules without its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpd.backends.torch.backend import from_pretrained

    config = from_pretrained(AutoConfig, path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def linear_names_at(path: str) -> list[str]:
    """The same names from a model folder, without reading its weights (meta device)."""
    return linear_names(_skeleton(path))


def _quiet_int8_cast(record) -> bool:
    """8-bit layers cast float32 inputs to float16 and log it at every call."""
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def load_quantized_base(path: str, spec: LoraSpec, backend, dtype: str = "auto"):
    """A bitsandbytes base (QLoRA): every linear layer of the blocks in 4-bit NF4 or 8-bit,
    the embeddings, norms and head at the frozen-model dtype (bfloat16 on CUDA under auto,
    float32 elsewhere), which is also the 4-bit layers' compute dtype."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hpd.backends.torch.backend import from_pretrained

    compute = backend.dtype_for(dtype, trainable=False)
    if spec.quantize == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    device = backend.device if backend.device.type != "cuda" else backend.device.index or 0
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_quiet_int8_cast)
    model = from_pretrained(AutoModelForCausalLM, path, quantization_config=quant, dtype=compute,
                            device_map={"": device})
    model.requires_grad_(False)
    for module in _bnb_modules(model).values():
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first forward in
        # eval mode and rounds its block scales to bfloat16 for good: the base would change at
        # the first evaluation. The float32 path stays exact and the same in both modes.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def apply(model, spec: LoraSpec, *, seed: int, base: dict, gradient_checkpointing: bool = False):
    """The peft model over `model` with LoRA on the spec's targets, A drawn from the seed.
    Returns the wrapped model (peft wraps, where mlx-lm swaps layers in place)."""
    peft = _peft()
    names = resolve_targets(linear_names(model), spec.targets)
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                             target_modules=names, bias="none", task_type="CAUSAL_LM")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    wrapped = peft.get_peft_model(model, config)
    inner = wrapped.get_base_model()
    with torch.no_grad():
        for name in names:
            layer = inner.get_submodule(name)
            a = layer.lora_A[_ADAPTER].weight
            a.copy_(torch.from_numpy(initial_a(seed, name, spec.rank, a.shape[1])))
            layer.lora_B[_ADAPTER].weight.zero_()
    wrapped.train()
    wrapped.hpd_lora = Attached(spec=spec, base=base, layers=len(model.get_decoder().layers), modules=names)
    return wrapped


def _lora_layers(model):
    inner = model.get_base_model()
    return [(name, inner.get_submodule(name)) for name in model.hpd_lora.modules]


def adapters(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name, layer in _lora_layers(model):
        a = layer.lora_A[_ADAPTER].weight.detach().to("cpu", torch.float32).numpy().copy()
        b = layer.lora_B[_ADAPTER].weight.detach().to("cpu", torch.float32).numpy().copy()
        out[name] = (a, b)
    return out


def set_adapters(model, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    layers = dict(_lora_layers(model))
    if sorted(layers) != sorted(arrays):
        raise ValueError(f"the adapters cover {len(arrays)} layers, the model has {len(layers)} LoRA layers")
    with torch.no_grad():
        for name, (a, b) in arrays.items():
            layers[name].lora_A[_ADAPTER].weight.copy_(torch.from_numpy(np.ascontiguousarray(a)))
            layers[name].lora_B[_ADAPTER].weight.copy_(torch.from_numpy(np.ascontiguousarray(b)))


def counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_merged(model, tokenizer, folder, backend, quantized: bool = False) -> None:
    """Export the student with the adapters folded into dense weights; a copy is merged, so the
    model in memory keeps training as it was. A bitsandbytes base is dequantized first, so the
    adapters' update is added in float32 and never re-quantized."""
    if quantized:
        raise ValueError("a quantized export is written by the mlx backend only; on torch the "
                         "QLoRA student is exported dequantized")
    if _bnb_modules(model.get_base_model()):
        backend.save_model(_dequantized_merge(model), tokenizer, folder)
        return
    merged = copy.deepcopy(model).merge_and_unload()
    backend.save_model(merged, tokenizer, folder)


def _bnb_modules(model) -> dict:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def merged_weights(model) -> dict[str, torch.Tensor]:
    """The student's dense weights under the base model's checkpoint names: scale * B @ A
    added to each adapted layer's weight, and a bitsandbytes base dequantized (peft's own
    helper; those layers come out float32). Copies where a layer changes, the model's own
    tensors elsewhere: the model is left as it is."""
    inner = model.get_base_model()
    lora = dict(_lora_layers(model))
    quantized = _bnb_modules(inner)
    state = {}
    with torch.no_grad():
        for name, tensor in inner.state_dict().items():
            # the quantized layers' weights and statistics are rebuilt below; adapters are merged
            if ".lora_" in name or any(name.startswith(q + ".") for q in quantized):
                continue
            state[name.replace(".base_layer.", ".")] = tensor.detach()
        for name, module in quantized.items():
            from peft.utils.integrations import dequantize_bnb_weight

            owner = name.removesuffix(".base_layer")
            weight = module.weight
            state[f"{owner}.weight"] = dequantize_bnb_weight(
                weight, state=getattr(weight, "quant_state", None) or module.state).float()
            if module.bias is not None:
                state[f"{owner}.bias"] = module.bias.detach().float()
        for owner, layer in lora.items():
            weight = state[f"{owner}.weight"]
            state[f"{owner}.weight"] = weight + layer.get_delta_weight(_ADAPTER).to(weight.dtype)
    return state


def _dequantized_merge(model):
    """A plain float32 transformers model with the student's weights: every bitsandbytes
    layer dequantized, plus scale * B @ A where it carries an adapter."""
    from transformers import AutoModelForCausalLM

    inner = model.get_base_model()
    state = {name: tensor.to("cpu", torch.float32) for name, tensor in merged_weights(model).items()}
    config = copy.deepcopy(inner.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dense.load_state_dict(state, strict=True, assign=True)
    buffers = dict(inner.named_buffers())  # the ones state_dict leaves out (rotary frequencies)
    for name, buffer in list(dense.named_buffers()):
        if buffer.is_meta:
            owner, leaf = name.rsplit(".", 1)
            dense.get_submodule(owner).register_buffer(leaf, buffers[name].detach().to("cpu").clone(),
                                                       persistent=False)
    if getattr(config, "tie_word_embeddings", False):
        dense.tie_weights()
    return dense
