"""Checkpoints: a loadable model folder plus training state, written atomically.

    checkpoints/step-N/   config.json, model safetensors, tokenizer files   (the student)
                          optimizer.safetensors (+ backend JSON)             (optimizer state)
                          rng.safetensors                                    (RNG states)
                          trainer_state.json                                 (step, data position, schedule)

A checkpoint is written into a hidden temporary folder and renamed into place, so a
kill during the write leaves the previous checkpoint whole. Tensors are safetensors and
the rest JSON: nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, backend, model, tokenizer, optimizer, state: dict,
                    keep: int = 2) -> Path:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    backend.save_model(model, tokenizer, tmp)
    backend.save_training_state(model, optimizer, tmp)
    save_file({k: np.ascontiguousarray(v) for k, v in backend.rng_state().items()}, str(tmp / RNG_FILE))
    _write_json(tmp / STATE_FILE, {"step": step, **state})  # last: marks the folder complete
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def load_state(folder: Path, backend, model, optimizer) -> dict:
    folder = Path(folder)
    backend.load_training_state(model, optimizer, folder)
    backend.set_rng_state(load_file(str(folder / RNG_FILE)))
    with open(folder / STATE_FILE) as fh:
        return json.load(fh)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _prune(root: Path, keep: int) -> None:
    for p in root.iterdir():  # leftovers of interrupted writes
        if p.name.startswith(".tmp-step-") and not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
    ckpts = list_checkpoints(root.parent)
    for p in ckpts[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
