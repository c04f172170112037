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

import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from hpd.files.filemodes import respect_umask
from hpd.models.student import save_weights

STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.safetensors"
DIST_DIR = "distributed"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint was not written; the message names the latest intact one."""


def temp_folder(run_dir: Path, step: int, collective: bool = False) -> Path:
    """Where checkpoint `step` is written before it is renamed into place."""
    return checkpoint_root(run_dir) / f".tmp-step-{step}-{'distributed' if collective else os.getpid()}"


def save_checkpoint(run_dir: Path, step: int, backend, model, tokenizer, optimizer, state: dict,
                    keep: int = 2) -> Path:
    collective = backend.collective_checkpoint
    finite = backend.weights_finite(model)
    if collective:  # every rank saves its shards: all must agree to write
        finite = backend.all_reduce_sum(0.0 if finite else 1.0) == 0
    if not finite:  # "the last good state" must be one
        raise CheckpointError(f"checkpoint step-{step} not written: the student's weights hold NaN or Inf; "
                              f"{_latest_text(run_dir)}")
    try:
        if collective:
            return _save_collective(run_dir, step, backend, model, tokenizer, optimizer, state, keep)
        return _save_single(run_dir, step, backend, model, tokenizer, optimizer, state, keep)
    except BaseException as e:
        # a failed or interrupted write leaves nothing behind (rank 0 owns a collective folder)
        if not collective or backend.rank == 0:
            shutil.rmtree(temp_folder(run_dir, step, collective), ignore_errors=True)
        if isinstance(e, OSError):
            reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            where = f" ({e.filename})" if e.filename else ""
            raise CheckpointError(f"checkpoint step-{step} not written: {reason}{where}; "
                                  f"{_latest_text(run_dir)}") from e
        raise


def _latest_text(run_dir: Path) -> str:
    try:
        latest = latest_checkpoint(run_dir)
    except ValueError:
        latest = None
    return (f"the latest intact checkpoint is {latest}" if latest is not None
            else "there is no intact checkpoint")


def _save_single(run_dir: Path, step: int, backend, model, tokenizer, optimizer, state: dict,
                 keep: int) -> Path:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = temp_folder(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(backend, model, tokenizer, tmp)
    backend.save_training_state(model, optimizer, tmp)
    save_file({k: np.ascontiguousarray(v) for k, v in backend.rng_state().items()}, str(tmp / RNG_FILE))
    _write_json(tmp / STATE_FILE, {"step": step, **state})  # last: marks the folder complete
    respect_umask(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(root, keep)
    return final


def load_state(folder: Path, backend, model, optimizer) -> dict:
    folder = Path(folder)
    if backend.collective_checkpoint:
        return _load_collective(folder, backend, model, optimizer)
    if (folder / DIST_DIR).exists():
        raise ValueError(f"{folder} was written by a run of several processes; resume it with torchrun "
                         "and the same number of processes")
    state = read_state(folder)
    backend.load_training_state(model, optimizer, folder)
    backend.set_rng_state(load_file(str(folder / RNG_FILE)))
    return state


def _save_collective(run_dir: Path, step: int, backend, model, tokenizer, optimizer, state: dict,
                     keep: int) -> Path:
    """Called on every rank. Rank 0 owns the folder and renames it into place once all
    ranks have written their part; the temporary name is the same on every rank."""
    rank = backend.rank
    root = checkpoint_root(run_dir)
    final = root / f"step-{step}"
    tmp = temp_folder(run_dir, step, collective=True)
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
        respect_umask(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    backend.barrier()
    return final


def _load_collective(folder: Path, backend, model, optimizer) -> dict:
    state = read_state(folder)
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
        if m and p.is_symlink():
            raise ValueError(f"{p} is a symbolic link (to {os.readlink(p)}); a checkpoint must be a folder "
                             "inside the run folder: replace the link by a copy")
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


def _nonneg_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# trainer_state.json: field -> check, for the fields a resume reads
_STATE_FIELDS = {
    "step": _nonneg_int,
    "total_steps": lambda x: _nonneg_int(x) and x > 0,
    "world_size": lambda x: _nonneg_int(x) and x > 0,
    "data.epoch": _nonneg_int,
    "data.index": _nonneg_int,
    "loop.step": _nonneg_int,
    "loop.bad_steps": _nonneg_int,
    "loop.skipped_steps": _nonneg_int,
    "schedule.last_eval_step": lambda x: x is None or _nonneg_int(x),
    "schedule.last_eval_loss": lambda x: x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)),
    "schedule.lambda_changes": lambda x: isinstance(x, list) and all(
        isinstance(c, list) and len(c) == 2 and _nonneg_int(c[0]) and isinstance(c[1], (int, float))
        and not isinstance(c[1], bool) for c in x),
}
_REQUIRED = ("step", "data", "loop", "schedule")
_SECTIONS = {"data": {"epoch", "index"}, "loop": {"step", "bad_steps", "skipped_steps"},
             "schedule": {"last_eval_step", "last_eval_loss", "lambda_changes"}}


def read_state(folder: Path) -> dict:
    """trainer_state.json, validated: a checkpoint from elsewhere gets a message naming the
    file and the field, not a TypeError deep inside the resume. Links are refused too."""
    folder = Path(folder)
    for p in folder.iterdir():
        if p.is_symlink():
            raise ValueError(f"{p} is a symbolic link; a checkpoint holds its own files")
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(state).__name__}")
    for name in _REQUIRED:
        if name not in state:
            raise ValueError(f"{path}: field {name!r} is missing")
    for section, keys in _SECTIONS.items():
        value = state[section]
        if not isinstance(value, dict):
            raise ValueError(f"{path}: field {section!r} must be an object, got {type(value).__name__}")
        if set(value) != keys:
            raise ValueError(f"{path}: field {section!r} has keys {sorted(value)}; expected {sorted(keys)}")
    for name, ok in _STATE_FIELDS.items():
        head, _, tail = name.partition(".")
        if head not in state or (tail and tail not in state[head]):
            continue
        value = state[head][tail] if tail else state[head]
        if not ok(value):
            raise ValueError(f"{path}: field {name!r} has an invalid value {value!r}")
    if state["loop"]["step"] != state["step"]:
        raise ValueError(f"{path}: field 'loop.step' ({state['loop']['step']}) differs from 'step' ({state['step']})")
    return state
