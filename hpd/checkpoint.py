"""Checkpoints: a loadable model folder plus training state, written atomically.

    checkpoints/step-N/   config.json, model safetensors, tokenizer files   (the student)
                          or lora.safetensors + lora.json, tokenizer files  (a LoRA student's adapters)
                          optimizer.safetensors (+ backend JSON)             (optimizer state)
                          rng.safetensors                                    (RNG states)
                          trainer_state.json                                 (step, data position, schedule)

A checkpoint is written into a hidden temporary folder and renamed into place, so a
kill during the write leaves the previous checkpoint whole. Tensors are safetensors and
the rest JSON: nothing is unpickled on load.

A run of several processes (a backend with `collective_checkpoint`, e.g. torch under
torchrun) keeps the same top-level files, written by rank 0 (the full student weights are
gathered to it), and adds the sharded training state, which every rank writes:

    checkpoints/step-N/distributed/   the backend's sharded model + optimizer state
                                      rng-<rank>.safetensors (each rank's RNG states)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from hpd.student import save_weights

STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.safetensors"
DIST_DIR = "distributed"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, backend, model, tokenizer, optimizer, state: dict,
                    keep: int = 2) -> Path:
    if getattr(backend, "collective_checkpoint", False):
        return _save_collective(run_dir, step, backend, model, tokenizer, optimizer, state, keep)
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(backend, model, tokenizer, tmp)
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
    if getattr(backend, "collective_checkpoint", False):
        return _load_collective(folder, backend, model, optimizer)
    if (folder / DIST_DIR).exists():
        raise ValueError(f"{folder} was written by a run of several processes; resume it with torchrun "
                         "and the same number of processes")
    backend.load_training_state(model, optimizer, folder)
    backend.set_rng_state(load_file(str(folder / RNG_FILE)))
    with open(folder / STATE_FILE) as fh:
        return json.load(fh)


def _save_collective(run_dir: Path, step: int, backend, model, tokenizer, optimizer, state: dict,
                     keep: int) -> Path:
    """Called on every rank. Rank 0 owns the folder and renames it into place once all
    ranks have written their part; the temporary name is the same on every rank."""
    rank = backend.rank
    root = checkpoint_root(run_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-distributed"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / DIST_DIR).mkdir(parents=True)
    backend.barrier()
    save_weights(backend, model, tokenizer, tmp)  # gathered to rank 0, which writes it
    backend.save_training_state(model, optimizer, tmp / DIST_DIR)
    save_file({k: np.ascontiguousarray(v) for k, v in backend.rng_state().items()},
              str(tmp / DIST_DIR / f"rng-{rank}.safetensors"))
    backend.barrier()
    if rank == 0:
        _write_json(tmp / STATE_FILE, {"step": step, "world_size": backend.world_size, **state})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    backend.barrier()
    return final


def _load_collective(folder: Path, backend, model, optimizer) -> dict:
    with open(folder / STATE_FILE) as fh:
        state = json.load(fh)
    saved = state.get("world_size", 1)
    if not (folder / DIST_DIR).exists():
        raise ValueError(f"{folder} was written by a single process; resume it without torchrun")
    if saved != backend.world_size:
        raise ValueError(f"{folder} was written by {saved} processes, this run has {backend.world_size}; "
                         "resume with the same number (each rank's data position and RNG state are saved)")
    backend.load_training_state(model, optimizer, folder / DIST_DIR)
    backend.set_rng_state(load_file(str(folder / DIST_DIR / f"rng-{backend.rank}.safetensors")))
    return state


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
