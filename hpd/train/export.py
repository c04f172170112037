"""`hpd export`: a run's checkpoint to a student folder (merged, adapters only, or quantized)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hpd.backends import get_backend
from hpd.files.outdir import ensure_writable
from hpd.models import lora
from hpd.models.export import CONTRACT_FILES, check_model_folder, finalize
from hpd.models.loading import INDEX_FILE, weight_files
from hpd.models.student import export_kind, load_base
from hpd.train.checkpoint import STATE_FILE, read_state


def metrics_at(path: Path, step) -> dict:
    """The latest value of each metric logged up to `step` in a run's metrics.jsonl (a
    checkpoint's own metrics), without the schedule's decisions; {} when there is no log."""
    if not path.exists() or step is None:
        return {}
    latest = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and 0 < record.get("step", 0) <= step and not record.get("skipped"):
            latest.update({k: v for k, v in record.items() if not k.startswith("schedule/")})
    latest.pop("step", None)
    return latest


def export_checkpoint(checkpoint: Path, out: Path, *, overwrite: bool = False, adapter_only: bool = False,
                      quantized: bool = False) -> Path:
    """`hpd export`: the checkpoint's student, without training state, as an exported folder
    (a LoRA checkpoint's adapters merged into their base, or as adapters with adapter_only)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / STATE_FILE).exists():
        raise FileNotFoundError(f"{checkpoint} is not an hpd checkpoint (no {STATE_FILE})")
    if lora.read_meta(checkpoint) is not None:
        return _export_lora(checkpoint, out, overwrite=overwrite, adapter_only=adapter_only, quantized=quantized)
    if adapter_only:
        raise ValueError(f"{checkpoint} holds a full fine-tune: it has no adapters to export")
    if quantized:
        raise ValueError(f"{checkpoint} holds a full fine-tune: --quantized is for an mlx QLoRA student")
    check_model_folder(checkpoint)
    state = read_state(checkpoint)  # refuses links and malformed state before anything is copied
    weights = weight_files(checkpoint)
    index = checkpoint / INDEX_FILE
    wanted = [*weights, *([index] if index.exists() else []),
              *(checkpoint / name for name in CONTRACT_FILES if (checkpoint / name).exists())]
    manifest = ensure_writable(out, overwrite)
    with manifest.recording():
        for p in wanted:
            shutil.copyfile(p, out / p.name)
        info = dict(state.get("run_info", {}))
        info["steps"] = state.get("step")
        info.setdefault("final_metrics", metrics_at(checkpoint.parent.parent / "metrics.jsonl", info["steps"]))
        from transformers import AutoTokenizer

        finalize(out, AutoTokenizer.from_pretrained(str(out)), info)
    return out


def _export_lora(checkpoint: Path, out: Path, *, overwrite: bool, adapter_only: bool, quantized: bool) -> Path:
    from transformers import AutoTokenizer

    if quantized and (adapter_only or not lora.spec_of(lora.read_meta(checkpoint)).quantize):
        raise ValueError(f"{checkpoint}: --quantized needs an mlx QLoRA checkpoint and no --adapter-only")

    state = read_state(checkpoint)  # refuses links and malformed state before anything is written
    manifest = ensure_writable(out, overwrite)
    with manifest.recording():
        meta = export_lora_checkpoint(checkpoint, out, adapter_only=adapter_only, quantized=quantized)
        info = dict(state.get("run_info", {}))
        info["steps"] = state.get("step")
        info.setdefault("final_metrics", metrics_at(checkpoint.parent.parent / "metrics.jsonl", info["steps"]))
        info["lora"] = {**meta["lora"], "export": export_kind(adapter_only, quantized)}
        finalize(out, AutoTokenizer.from_pretrained(str(checkpoint)), info)
    return out


def export_lora_checkpoint(checkpoint: Path, out: Path, *, adapter_only: bool, quantized: bool = False) -> dict:
    """`hpd export` of a LoRA checkpoint: its adapters as they are, or merged into the base
    it names (loaded with the backend that trained it; `quantized` keeps an mlx QLoRA base's
    quantization)."""
    meta = lora.read_meta(checkpoint)
    spec, base = lora.spec_of(meta), meta["base"]
    if quantized and adapter_only:
        raise ValueError("--quantized and --adapter-only exclude each other: adapters have no quantization")
    adapters = lora.load_adapters(checkpoint)
    if adapter_only:
        lora.write_adapter_formats(out, adapters, spec, base["path"], meta["num_layers"])
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(checkpoint)).save_pretrained(out)
        return meta
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    backend = get_backend(state.get("run_info", {}).get("backend", "torch"))
    if quantized and not (spec.quantize and backend.name == "mlx"):
        raise ValueError(f"{checkpoint}: --quantized keeps the quantization of an mlx QLoRA base; this "
                         f"checkpoint's student is a {backend.name} LoRA over a "
                         f"{f'{spec.quantize}-bit' if spec.quantize else 'full-precision'} base")
    if lora.base_identity(base["path"]).get("config_sha256") != base.get("config_sha256"):
        raise ValueError(f"{checkpoint}: its base {base['path']!r} changed since training; cannot merge")
    model = load_base(backend, base["path"], spec, "float32")
    model = backend.lora.apply(model, spec, seed=0, base=base) or model
    backend.lora.set_adapters(model, adapters)
    from transformers import AutoTokenizer

    backend.lora.save_merged(model, AutoTokenizer.from_pretrained(str(checkpoint)), out, backend, quantized=quantized)
    return meta
