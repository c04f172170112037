"""The exported student folder: the contract both backends write.

config.json (in the forms both transformers 5 and mlx-lm read), safetensors weights
(sharded with an index when large), tokenizer files, generation_config.json and a
README.md model card. It loads unchanged with `mlx_lm.load` and with transformers'
`AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from hpd.checkpoint import STATE_FILE, read_state
from hpd.filemodes import respect_umask
from hpd.models import INDEX_FILE, weight_files
from hpd.outdir import ensure_writable

# the name on the package index (`hpd` there is an unrelated project); `import hpd` is unchanged
DISTRIBUTION = "hpd-distill"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def fix_config(folder: Path) -> None:
    """Write the config in both forms (hpd.families.both_forms): transformers 5's nested
    rope_parameters and the top-level keys that mlx-lm and older transformers read."""
    from hpd.families import both_forms

    path = Path(folder) / "config.json"
    config = both_forms(json.loads(path.read_text()))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_generation_config(folder: Path, tokenizer) -> None:
    path = Path(folder) / "generation_config.json"
    if path.exists():
        return
    gen = {"eos_token_id": tokenizer.eos_token_id}
    if tokenizer.bos_token_id is not None:
        gen["bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.pad_token_id is not None:
        gen["pad_token_id"] = tokenizer.pad_token_id
    path.write_text(json.dumps(gen, indent=2) + "\n")


def check_model_folder(folder: Path) -> None:
    """Fail clearly when a folder lacks what both ecosystems need to load it."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json")
    if not list(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder}: no safetensors weights")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); mlx-lm would silently "
            "build an empty tokenizer"
        )


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_card(info: dict) -> str:
    params = info.get("method_params") or {}
    params_text = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
    metrics = info.get("final_metrics") or {}
    rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in metrics.items()) or "| (none recorded) | |"
    mlx_only = (info.get("lora") or {}).get("export") == "quantized"
    loads = ("Loads with `mlx_lm.load` (mlx-lm's quantization; transformers cannot read it)." if mlx_only else
             "Loads with `transformers.AutoModelForCausalLM.from_pretrained` and `mlx_lm.load`.")
    return f"""---
library_name: {'mlx' if mlx_only else 'transformers'}
tags: [hpd, distillation]
---
# {info.get('name', 'hpd student')}

Distilled with [hpd](https://pypi.org/project/{DISTRIBUTION}/) (`pip install {DISTRIBUTION}`, {info.get('backend', '?')} backend).

| | |
|---|---|
| teacher | `{info.get('teacher', '?')}` |
| student initialisation | `{info.get('student', '?')}` |
| method | `{info.get('method', '?')}` ({params_text}), temperature {info.get('temperature', 1.0)} |
| data | `{info.get('data', '?')}` (sha256 `{info.get('data_sha256', '?')}`) |
| steps | {info.get('steps', '?')} |
{lora_card_row(info)}
## Final metrics

| metric | value |
|---|---|
{rows}

## Command

```
{info.get('command', '')}
```

{loads}
"""


def lora_card_row(info: dict) -> str:
    lora = info.get("lora")
    if not lora:
        return ""
    quant = f", over a {lora['quantize']}-bit base (QLoRA)" if lora.get("quantize") else ""
    how = {"merged": "merged into the base weights" + (", dequantized" if lora.get("quantize") else ""),
           "quantized": f"merged into the base weights and quantized again ({lora.get('quantize')}-bit, mlx-lm "
                        "affine, the base's group sizes), as mlx-lm's fuse writes it: for mlx_lm.load only",
           "adapter": "adapters only: peft/ for PeftModel.from_pretrained, mlx-lm/ for "
                      "mlx_lm.load(base, adapter_path=...)"}[lora["export"]]
    return (f"| LoRA | rank {lora['rank']}, alpha {lora['alpha']:g}, targets {lora['targets']}{quant}; "
            f"{how} |\n")


def finalize(folder: Path, tokenizer, info: dict) -> None:
    folder = Path(folder)
    adapter_only = (info.get("lora") or {}).get("export") == "adapter"
    if not adapter_only:  # an adapter folder holds peft/ and mlx-lm/, no model of its own
        fix_config(folder)
        write_generation_config(folder, tokenizer)
    (folder / "README.md").write_text(model_card(info))
    (folder / "hpd_export.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    respect_umask(folder, recursive=False)  # checkpoints/ got theirs when written
    if not adapter_only:
        check_model_folder(folder)


# Everything an exported folder holds besides the weights (hpd.models.weight_files): the
# contract. Nothing else in a checkpoint is copied (no pickles, no stray files, no links).
CONTRACT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                  "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                  "added_tokens.json", "chat_template.jinja", "chat_template.json")


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
    from hpd.lora import read_meta

    if read_meta(checkpoint) is not None:
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

    from hpd.lora import read_meta, spec_of
    from hpd.student import export_kind, export_lora_checkpoint

    if quantized and (adapter_only or not spec_of(read_meta(checkpoint)).quantize):
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
