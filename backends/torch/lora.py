"""LoRA students on torch, through peft (the optional `lora` extra, imported only here).

Mirrors `hpd.backends.mlx.lora` function for function. Adapters cross this module as numpy
pairs A (r, in), B (out, r) keyed by the layer's full name in the transformers model
(model.layers.0.self_attn.q_proj), which is also the name mlx-lm gives the layer.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from hpd.lora import Attached, LoraSpec, initial_a, resolve_targets

_ADAPTER = "default"


def _peft():
    try:
        import peft
    except ImportError:
        raise ValueError("LoRA on the torch backend needs peft: pip install 'hpd[lora]' "
                         "(or use --backend mlx, whose LoRA comes with mlx-lm)") from None
    return peft


def check_supported(spec: LoraSpec, backend) -> None:
    """Fail before loading anything when the spec cannot run here."""
    _peft()
    if backend.world_size > 1:
        # the adapters would need their own DDP/FSDP wrapping to keep ranks in sync
        raise ValueError("LoRA students on the torch backend run in a single process; under torchrun "
                         "train the whole student, or use --backend mlx with mlx.launch")
    if spec.quantize:
        if backend.device.type != "cuda":
            raise ValueError(f"--student-quantize {spec.quantize} on the torch backend needs CUDA "
                             f"(bitsandbytes); this run is on {backend.device.type}. Use --backend mlx "
                             "--student-quantize (mlx-lm quantization), or drop --student-quantize")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("--student-quantize on the torch backend needs bitsandbytes: "
                             "pip install bitsandbytes (CUDA only)") from None


def _layer_prefix(model) -> str:
    first = model.get_decoder().layers[0]
    for name, module in model.named_modules():
        if module is first:
            return name.rsplit(".", 1)[0]
    raise ValueError("cannot find the decoder blocks of this model")


def linear_names(model) -> list[str]:
    """Full names of the linear layers inside the decoder blocks (the head and embeddings are
    left alone, as peft's all-linear does)."""
    prefix = _layer_prefix(model)
    layers = model.get_decoder().layers
    linear = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    return [f"{prefix}.{i}.{name}" for i, layer in enumerate(layers)
            for name, module in layer.named_modules() if isinstance(module, linear)]


def linear_names_at(path: str) -> list[str]:
    """The same names from a model folder, without reading its weights (meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpd.backends.torch.backend import from_pretrained

    config = from_pretrained(AutoConfig, path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_names(model)


def load_quantized_base(path: str, spec: LoraSpec, backend):
    """A bitsandbytes 4- or 8-bit base on CUDA (QLoRA), prepared for adapter training."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hpd.backends.torch.backend import from_pretrained

    if spec.quantize == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = from_pretrained(AutoModelForCausalLM, path, quantization_config=quant,
                            device_map={"": backend.device.index or 0})
    model.requires_grad_(False)
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


def save_merged(model, tokenizer, folder, backend) -> None:
    """Export the student with the adapters folded into dense weights; a copy is merged, so the
    model in memory keeps training as it was."""
    merged = copy.deepcopy(model).merge_and_unload()
    backend.save_model(merged, tokenizer, folder)
