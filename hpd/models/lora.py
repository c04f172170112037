"""LoRA students, the part both backends share: the spec, the seeded initialisation, target
names, the base's identity, and the adapter files (hpd's checkpoint form, peft's and mlx-lm's).

The adapter layers themselves come from the libraries (peft on torch, mlx-lm's tuner on mlx:
`hpd.backends.<name>.lora`). Both hold, per adapted linear layer `name` with weight W (out, in),
A (r, in) and B (out, r) with y = x W.T + (alpha / r) * (x A.T) B.T; mlx-lm stores the same
matrices transposed (lora_a (in, r), lora_b (r, out)). A is drawn here, from a numpy generator
keyed by the seed and the layer's name, so both backends start from the same adapter; B starts
at zero, as both libraries do.

This module imports neither torch nor mlx.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ALL_LINEAR = "all-linear"
ADAPTER_FILE = "lora.safetensors"  # in a checkpoint: {name}.lora_A (r, in), {name}.lora_B (out, r)
ADAPTER_META = "lora.json"
PEFT_DIR, MLX_DIR = "peft", "mlx-lm"


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str = ALL_LINEAR  # all-linear, or comma-separated leaf names (q_proj,v_proj)
    quantize: int = 0  # bits of the frozen base (QLoRA); 0: full precision

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg) -> LoraSpec | None:
        if not getattr(cfg, "lora_rank", 0):
            return None
        return cls(rank=int(cfg.lora_rank), alpha=float(cfg.lora_alpha), dropout=float(cfg.lora_dropout),
                   targets=normalise_targets(cfg.lora_targets), quantize=int(cfg.student_quantize))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Attached:
    """What a LoRA student carries (as model.hpd_lora): its spec, its base's identity, how
    many decoder blocks it has, and the full names of the adapted layers."""

    spec: LoraSpec
    base: dict
    layers: int
    modules: list


def attached(model) -> Attached | None:
    return getattr(model, "hpd_lora", None)


def normalise_targets(targets: str) -> str:
    targets = (targets or ALL_LINEAR).strip()
    if targets == ALL_LINEAR:
        return targets
    return ",".join(sorted({t.strip() for t in targets.split(",") if t.strip()}))


def config_errors(cfg) -> list[str]:
    """The LoRA fields' cross-checks (ranges are checked by DistillConfig's metadata)."""
    errors = []
    if getattr(cfg, "student_quantize", 0) and not getattr(cfg, "lora_rank", 0):
        errors.append(f"student_quantize={cfg.student_quantize} needs lora_rank (--lora-rank): a quantized "
                      "base cannot be trained directly, only LoRA adapters on top of it")
    if getattr(cfg, "adapter_only", False) and not getattr(cfg, "lora_rank", 0):
        errors.append("adapter_only needs lora_rank (--lora-rank): a full fine-tune has no adapter")
    if getattr(cfg, "export_quantized", False):
        if not getattr(cfg, "student_quantize", 0):
            errors.append("export_quantized needs student_quantize (--student-quantize with --lora-rank): "
                          "only a quantized base has a quantization to keep")
        elif getattr(cfg, "backend", "mlx") != "mlx":
            errors.append("export_quantized is for --backend mlx (mlx-lm quantization); a torch QLoRA "
                          "student is exported dequantized")
        if getattr(cfg, "adapter_only", False):
            errors.append("export_quantized and adapter_only exclude each other: adapters have no quantization")
    targets = normalise_targets(getattr(cfg, "lora_targets", ALL_LINEAR))
    if targets != ALL_LINEAR and not all(t.replace("_", "").isalnum() for t in targets.split(",")):
        errors.append(f"lora_targets={cfg.lora_targets!r}: expected all-linear or module names such as "
                      "q_proj,v_proj")
    return errors


def resolve_targets(linear: list[str], targets: str) -> list[str]:
    """Full names of the layers to adapt, out of `linear` (the decoder blocks' linear layers,
    e.g. model.layers.0.self_attn.q_proj). Unknown names fail with the model's list."""
    if targets == ALL_LINEAR:
        return list(linear)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    wanted = targets.split(",")
    unknown = [t for t in wanted if t not in leaves]
    if unknown:
        raise ValueError(f"--lora-targets: the model has no linear layer named {', '.join(unknown)}; "
                         f"its linear layers are {', '.join(leaves)} (or use all-linear)")
    return [name for name in linear if name.rsplit(".", 1)[-1] in wanted]


def block_linear_names(model, layers, linear) -> list[str]:
    """Full names of the linear layers (instances of `linear`) inside the decoder blocks
    `layers` of `model`; the head and embeddings are left alone, as peft's all-linear does.
    Any module tree with `named_modules()` (torch's and mlx's alike)."""
    return [f"{layer_prefix(model, layers)}.{i}.{name}" for i, layer in enumerate(layers)
            for name, module in layer.named_modules() if isinstance(module, linear)]


def layer_prefix(model, layers) -> str:
    """The name of the decoder blocks' list `layers` inside `model` (e.g. model.layers)."""
    for name, module in model.named_modules():
        if module is layers[0]:
            return name.rsplit(".", 1)[0]
    raise ValueError("cannot find the decoder blocks of this model")


def initial_a(seed: int, name: str, rank: int, in_features: int) -> np.ndarray:
    """A (r, in) for layer `name`: uniform in +-1/sqrt(in) (mlx-lm's range), from a generator
    keyed by (seed, name) so that neither the backend nor the order of layers changes it."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([int(seed) % 2**63, key])
    bound = 1.0 / math.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)


# ---------------------------------------------------------------------- the base's identity
def base_identity(path: str) -> dict:
    """What names a base model: its path, the hash of its config.json, and its weight files'
    names and sizes (hashing gigabytes of weights at every start would cost minutes)."""
    from hpd.models.loading import local_or_hub

    source = local_or_hub(path)
    if not isinstance(source, Path):
        return {"path": path}
    config = source / "config.json"
    weights = sorted((p.name, p.stat().st_size) for p in source.glob("*.safetensors"))
    return {"path": str(path), "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
            "weights": [list(w) for w in weights]}


def check_resume(meta: dict | None, spec: LoraSpec | None, base: dict, folder: Path) -> None:
    """Refuse to resume a checkpoint with another base or LoRA configuration."""
    if meta is None and spec is None:
        return
    if meta is None:
        raise ValueError(f"{folder} holds a full fine-tune; resume it without --lora-rank "
                         "(or start a new run with LoRA)")
    if spec is None:
        raise ValueError(f"{folder} holds LoRA adapters (rank {meta['lora']['rank']}); resume it with the "
                         "same --lora-* flags")
    saved = meta["lora"]
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in spec.to_dict().items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"{folder} was trained with another LoRA configuration ({'; '.join(changed)}); "
                         "resume with the checkpoint's --lora-* flags")
    old = meta["base"]
    if {k: old.get(k) for k in ("config_sha256", "weights")} != {k: base.get(k) for k in ("config_sha256", "weights")}:
        raise ValueError(f"{folder} holds adapters for the base {old.get('path')!r}, and --student "
                         f"{base.get('path')!r} is another model; resume with the same --student")


# ---------------------------------------------------------------------- files
def save_adapters(folder: Path, adapters: dict[str, tuple[np.ndarray, np.ndarray]], spec: LoraSpec,
                  base: dict, layers: int) -> None:
    """hpd's checkpoint form: A and B per layer as safetensors, the spec and base as JSON."""
    from safetensors.numpy import save_file

    tensors = {}
    for name, (a, b) in adapters.items():
        tensors[f"{name}.lora_A"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"{name}.lora_B"] = np.ascontiguousarray(b, dtype=np.float32)
    save_file(tensors, str(Path(folder) / ADAPTER_FILE))
    meta = {"format": "hpd-lora-1", "lora": spec.to_dict(), "base": base, "num_layers": layers,
            "modules": sorted(adapters)}
    (Path(folder) / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(folder: Path) -> dict | None:
    path = Path(folder) / ADAPTER_META
    return json.loads(path.read_text()) if path.exists() else None


def load_adapters(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(folder) / ADAPTER_FILE))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: (tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]) for n in names}


def spec_of(meta: dict) -> LoraSpec:
    return LoraSpec(**meta["lora"])


def write_peft(folder: Path, adapters: dict, spec: LoraSpec, base_path: str) -> None:
    """adapter_model.safetensors + adapter_config.json, for peft.PeftModel.from_pretrained."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in adapters.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
              "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "bias": "none",
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in adapters}),
              "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_mlx(folder: Path, adapters: dict, spec: LoraSpec, base_path: str, layers: int) -> None:
    """adapters.safetensors + adapter_config.json, for mlx_lm.load(base, adapter_path=...)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors, keys = {}, set()
    for name, (a, b) in adapters.items():
        tensors[f"{name}.lora_a"] = np.ascontiguousarray(a.T, dtype=np.float32)
        tensors[f"{name}.lora_b"] = np.ascontiguousarray(b.T, dtype=np.float32)
        keys.add(name.split(".", 3)[3] if name.startswith("model.layers.") else name)
    save_file(tensors, str(folder / "adapters.safetensors"), metadata={"format": "mlx"})
    config = {"fine_tune_type": "lora", "model": base_path, "num_layers": layers,
              "lora_parameters": {"rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout,
                                  "keys": sorted(keys)}}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_adapter_formats(out: Path, adapters: dict, spec: LoraSpec, base_path: str, layers: int) -> None:
    write_peft(Path(out) / PEFT_DIR, adapters, spec, base_path)
    write_mlx(Path(out) / MLX_DIR, adapters, spec, base_path, layers)


def trainable_line(trainable: int, total: int) -> str:
    share = 100.0 * trainable / max(total, 1)
    return f"trainable parameters: {trainable:,} of {total:,} ({share:.3f}%)"


def describe(spec: LoraSpec) -> str:
    quant = f", {spec.quantize}-bit base (QLoRA)" if spec.quantize else ""
    return (f"LoRA rank {spec.rank}, alpha {spec.alpha:g} (scale {spec.scale:g}), dropout {spec.dropout:g}, "
            f"targets {spec.targets}{quant}")


__all__ = ["LoraSpec", "ALL_LINEAR", "initial_a", "resolve_targets", "base_identity", "check_resume",
           "save_adapters", "load_adapters", "read_meta", "write_adapter_formats", "trainable_line"]
