"""The exported student folder: the contract both backends write.

config.json (in the forms both transformers 5 and mlx-lm read), safetensors weights
(sharded with an index when large), tokenizer files, generation_config.json and a
README.md model card. It loads unchanged with `mlx_lm.load` and with transformers'
`AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

from hpd.files.filemodes import respect_umask

# the name on the package index (`hpd` there is an unrelated project); `import hpd` is unchanged
DISTRIBUTION = "hpd-distill"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def fix_config(folder: Path) -> None:
    """Write the config in both forms (hpd.models.families.both_forms): transformers 5's nested
    rope_parameters and the top-level keys that mlx-lm and older transformers read."""
    from hpd.models.families import both_forms

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


def model_card(info: dict) -> str:
    params = info.get("method_params") or {}
    params_text = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
    metrics = info.get("final_metrics") or {}
    rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in metrics.items()) or "| (none recorded) | |"
    mlx_only = (info.get("lora") or {}).get("export") == "quantized"
    loads = ("Loads with `mlx_lm.load` (mlx-lm's quantization; transformers cannot read it)." if mlx_only else
             "Loads with `transformers.AutoModelForCausalLM.from_pretrained` and `mlx_lm.load`.")
    backend = info.get("backend", "?")
    return f"""---
library_name: {'mlx' if mlx_only else 'transformers'}
tags: [hpd, distillation]
---
# {info.get('name', 'hpd student')}

Distilled with [hpd](https://pypi.org/project/{DISTRIBUTION}/) (`pip install {DISTRIBUTION}`, {backend} backend).

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


# Everything an exported folder holds besides the weights (hpd.models.loading.weight_files): the
# contract. Nothing else in a checkpoint is copied (no pickles, no stray files, no links).
CONTRACT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                  "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                  "added_tokens.json", "chat_template.jinja", "chat_template.json")


