"""Python's and numpy's RNG states as numpy byte arrays, for safetensors checkpoints.

Each backend adds its own framework's state beside these."""

from __future__ import annotations

import json
import random

import numpy as np


def _encode(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)


def _decode(arr) -> list:
    return json.loads(bytes(np.asarray(arr, dtype=np.uint8)).decode())


def host_rng_state() -> dict[str, np.ndarray]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"numpy": _encode([name, keys.tolist(), int(pos), int(has_gauss), float(cached)]),
            "python": _encode([version, list(internal), gauss])}


def set_host_rng_state(state: dict[str, np.ndarray]) -> None:
    name, keys, pos, has_gauss, cached = _decode(state["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = _decode(state["python"])
    random.setstate((version, tuple(internal), gauss))


def seed_host(seed: int) -> None:
    """Python's and numpy's global RNGs from one run seed (each backend seeds its framework's too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
