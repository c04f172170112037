"""The student a run trains: a full model, or LoRA adapters over a frozen (maybe quantized)
base. Loading, the weights a checkpoint keeps, and the export at the end, for either kind.

A LoRA checkpoint holds the adapters (hpd.models.lora's form), the tokenizer, and names its base;
the base itself is read again from --student on resume and on export.
"""

from __future__ import annotations

from pathlib import Path

from hpd.models import lora


def check_student(backend, cfg) -> lora.LoraSpec | None:
    """The checks that need no weights: backend support and target names (from the model's
    skeleton). Run before the output folder is touched."""
    spec = lora.LoraSpec.from_config(cfg)
    if spec is None:
        return None
    backend.lora.check_supported(spec, backend, cfg.student)
    lora.resolve_targets(backend.lora.linear_names_at(cfg.student), spec.targets)
    return spec


def load_student(backend, cfg, resume_from: Path | None, say=lambda message: None):
    spec = lora.LoraSpec.from_config(cfg)
    if resume_from is not None:
        lora.check_resume(lora.read_meta(resume_from), spec,
                          lora.base_identity(cfg.student) if spec else {}, Path(resume_from))
    if spec is None:
        return backend.load_model(str(resume_from or cfg.student), trainable=True, dtype=cfg.dtype)
    model = load_base(backend, cfg.student, spec, cfg.dtype)
    model = backend.lora.apply(model, spec, seed=cfg.seed, base=lora.base_identity(cfg.student),
                               gradient_checkpointing=cfg.gradient_checkpointing) or model
    if resume_from is not None:
        backend.lora.set_adapters(model, lora.load_adapters(resume_from))
    trainable, total = backend.lora.counts(model)
    say(f"student: {lora.describe(spec)}; {lora.trainable_line(trainable, total)}")
    return model


def load_base(backend, path: str, spec: lora.LoraSpec, dtype: str):
    """The frozen base: at the teacher's dtype rule (bfloat16 on an accelerator under auto,
    since no optimizer touches it), quantized for QLoRA."""
    if spec.quantize and backend.name == "torch":
        return backend.lora.load_quantized_base(path, spec, backend, dtype)
    return backend.load_model(path, trainable=False, dtype=dtype, quantize=spec.quantize)


def save_weights(backend, model, tokenizer, folder: Path) -> None:
    """A checkpoint's weights: the whole student, or only its adapters and the tokenizer."""
    state = lora.attached(model)
    if state is None:
        backend.save_model(model, tokenizer, folder)
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    lora.save_adapters(folder, backend.lora.adapters(model), state.spec, state.base, state.layers)
    tokenizer.save_pretrained(folder)


def export(backend, model, tokenizer, out: Path, *, adapter_only: bool = False, quantized: bool = False) -> None:
    """The end of a run: the merged student (the default; `quantized` keeps a QLoRA base's
    quantization, on mlx), or the adapters in peft's and mlx-lm's formats."""
    state = lora.attached(model)
    if state is None:
        backend.save_model(model, tokenizer, out)
    elif adapter_only:
        lora.write_adapter_formats(out, backend.lora.adapters(model), state.spec, state.base["path"],
                                   state.layers)
        tokenizer.save_pretrained(out)
    else:
        backend.lora.save_merged(model, tokenizer, out, backend, quantized=quantized)


def export_kind(adapter_only: bool = False, quantized: bool = False) -> str:
    return "adapter" if adapter_only else "quantized" if quantized else "merged"


def card_info(model, adapter_only: bool = False, quantized: bool = False) -> dict:
    """What the model card and hpd_export.json say about a LoRA student."""
    state = lora.attached(model)
    if state is None:
        return {}
    return {"lora": {**state.spec.to_dict(), "export": export_kind(adapter_only, quantized), "base": state.base}}
