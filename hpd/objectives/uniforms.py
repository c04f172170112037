"""Counter-based uniforms: one per (seed, step, global row, position), from no RNG stream.

A process's random stream depends on how many draws came before, so a per-position
student sample drawn from it changes with the process count and the accumulation split.
Here each position's uniform is a pure function of its key, hashed with the SplitMix64
finaliser (Steele, Lea and Flood 2014), so 1 process x batch 8, 2 processes x batch 4
and 8 micro-batches of 1 draw the same value for the same token of the same row, and the
torch and mlx backends receive identical numbers (they are made here, in numpy).

The uniforms are multiples of 2**-24 in [0, 1): exact in float32, so no backend's cast
can round one up to 1.0.
"""

from __future__ import annotations

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2**64 / golden ratio)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_DOMAIN = 0x5EED5A3D1E  # separates these draws from any other keyed stream a later part adds


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a bijection of uint64 with full avalanche."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + _GAMMA
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _as_u64(x) -> np.ndarray:
    # negative keys (e.g. -1 for padding rows) wrap instead of raising
    return np.asarray(x, dtype=np.int64).astype(np.uint64)


def keyed_uniforms(seed: int, step: int, rows, positions) -> np.ndarray:
    """float32 uniforms in [0, 1), one per element of the broadcast of `rows` and `positions`.

    seed, step: the run's seed and the optimizer step (0-based); rows: global row (example)
    indices; positions: each token's position inside its own row. Each key is absorbed
    through a full mix, so neighbouring rows, positions and steps give unrelated values.
    """
    rows, positions = np.broadcast_arrays(_as_u64(rows), _as_u64(positions))
    h = mix64(np.uint64(_DOMAIN) ^ _as_u64(seed))
    h = mix64(h ^ _as_u64(step))
    h = mix64(h ^ rows)
    h = mix64(h ^ positions)
    return ((h >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)).astype(np.float32)


_SEED_DOMAIN = 0x5EED0F5A3B  # the per-request seeds of engine rollouts, apart from the uniforms


def keyed_seeds(seed: int, step: int, rows) -> np.ndarray:
    """int64 seeds in [0, 2**63), one per global row: the seed of that row's rollout request
    at `step` (an engine that seeds each request draws the same continuation for the same key,
    however the rows are batched, split over processes or resumed)."""
    rows = _as_u64(rows)
    h = mix64(np.uint64(_SEED_DOMAIN) ^ _as_u64(seed))
    h = mix64(h ^ _as_u64(step))
    h = mix64(h ^ rows)
    return (h >> np.uint64(1)).astype(np.int64)


def token_keys(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, positions), each shaped like batch["targets"]: the global row of every token
    and its position inside that row, for plain (one row per line) and packed batches.

    A packed batch carries "token_rows" and "position_ids"; a plain one "rows" (B,), the
    global row index of each line. Keys follow the target's position t (the token at
    t + 1 is predicted there), which is the same in both layouts.
    """
    targets = np.asarray(batch["targets"])
    if "token_rows" in batch:
        return np.asarray(batch["token_rows"]), np.asarray(batch["position_ids"])
    if "rows" not in batch:
        raise KeyError("the batch has no global row indices ('rows'); counter-based samples need them")
    rows = np.asarray(batch["rows"]).reshape(-1, 1)
    positions = np.arange(targets.shape[-1])[None, :]
    return np.broadcast_to(rows, targets.shape), np.broadcast_to(positions, targets.shape)


def has_row_keys(batch: dict) -> bool:
    return "rows" in batch or "token_rows" in batch


def batch_uniforms(seed: int, step: int, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The uniforms of every target position of a (micro-)batch, shaped like its targets."""
    rows, positions = token_keys(batch)
    return keyed_uniforms(seed, step, rows, positions)


__all__ = ["keyed_uniforms", "keyed_seeds", "batch_uniforms", "token_keys", "has_row_keys", "mix64"]
