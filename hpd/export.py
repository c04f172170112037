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

from hpd.checkpoint import RNG_FILE, STATE_FILE

TRAINING_FILES = {RNG_FILE, STATE_FILE, "optimizer.safetensors", "optimizer.json"}
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
                     for k, v in metrics.items())
    return f"""---
library_name: transformers
tags: [hpd, distillation]
---
# {info.get('name', 'hpd student')}

Distilled with [hpd](https://pypi.org/project/hpd/) ({info.get('backend', '?')} backend).

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

Loads with `transformers.AutoModelForCausalLM.from_pretrained` and `mlx_lm.load`.
"""


def lora_card_row(info: dict) -> str:
    lora = info.get("lora")
    if not lora:
        return ""
    quant = f", over a {lora['quantize']}-bit base (QLoRA)" if lora.get("quantize") else ""
    how = {"merged": "merged into the base weights" + (", dequantized" if lora.get("quantize") else ""),
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
    if not adapter_only:
        check_model_folder(folder)


# What a run or an export writes; --overwrite deletes a folder only when it holds nothing else.
_OWN_NAMES = {"checkpoints", "peft", "mlx-lm", "metrics.jsonl", "config.yaml", "config.json", "generation_config.json",
              "README.md", "hpd_export.json", "chat_template.jinja", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "model.safetensors.index.json"}


def _is_own(name: str) -> bool:
    return name in _OWN_NAMES or name.endswith(".safetensors") or name.startswith("tokenizer")


def ensure_writable(folder: Path, overwrite: bool) -> None:
    """Never write into a non-empty folder unless asked to, and never delete files that
    an hpd run did not write, even when asked to."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} is not empty; pass --overwrite to replace it")
        foreign = sorted(p.name for p in folder.iterdir() if not _is_own(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise FileExistsError(f"{folder} holds files hpd did not write ({shown}); --overwrite only "
                                  "replaces an earlier run or export. Choose another folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def export_checkpoint(checkpoint: Path, out: Path, *, overwrite: bool = False, adapter_only: bool = False
                      ) -> Path:
    """`hpd export`: the checkpoint's student, without training state, as an exported folder
    (a LoRA checkpoint's adapters merged into their base, or as adapters with adapter_only)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / STATE_FILE).exists():
        raise FileNotFoundError(f"{checkpoint} is not an hpd checkpoint (no {STATE_FILE})")
    from hpd.lora import read_meta

    if read_meta(checkpoint) is not None:
        return _export_lora(checkpoint, out, overwrite=overwrite, adapter_only=adapter_only)
    if adapter_only:
        raise ValueError(f"{checkpoint} holds a full fine-tune: it has no adapters to export")
    check_model_folder(checkpoint)
    ensure_writable(out, overwrite)
    for p in checkpoint.iterdir():
        if p.is_file() and p.name not in TRAINING_FILES:
            shutil.copy2(p, out / p.name)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    info = dict(state.get("run_info", {}))
    info["steps"] = state.get("step")
    from transformers import AutoTokenizer

    finalize(out, AutoTokenizer.from_pretrained(str(out)), info)
    return out


def _export_lora(checkpoint: Path, out: Path, *, overwrite: bool, adapter_only: bool) -> Path:
    from transformers import AutoTokenizer

    from hpd.student import export_lora_checkpoint

    ensure_writable(out, overwrite)
    meta = export_lora_checkpoint(checkpoint, out, adapter_only=adapter_only)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    info = dict(state.get("run_info", {}))
    info["steps"] = state.get("step")
    info["lora"] = {**meta["lora"], "export": "adapter" if adapter_only else "merged"}
    finalize(out, AutoTokenizer.from_pretrained(str(checkpoint)), info)
    return out
