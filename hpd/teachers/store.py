"""The offline teacher store: the teacher's top-k log-probs per target position, on disk.

A store is a folder of safetensors shards and an `index.json` (no pickle anywhere):

    index.json               format, settings, provenance, and the finished shards in order
    shard-00000.safetensors  examples [a, b) of the data file, in the data's order

Per target position (a position whose target counts, in the order `hpd.data.batches.collate`
lays them out: example by example, position by position) a shard holds

    ids           (P, k) uint16 when the vocabulary has <= 65536 tokens, (P, 3k) uint8
                  (3 little-endian bytes per id) up to 2**24 tokens, (P, k) uint32 beyond
    codes         the top-k log-probs, sorted descending, as distances below the row's
                  largest, d = max - lp in [0, span], quantized to 2**bits - 1 steps
                  (d > span is clipped to span): (P, k) uint16 at 16 bits, (P, k) uint8
                  at 8, (P, 3 * ceil(k / 2)) uint8 at 12 (two codes in three bytes)
    max_logprob   (P,) float32: the largest log-prob of the row
    data_logprob  (P,) float32: the data token's log-prob (it may lie outside the top k)
    rest_mass     (P,) float32: the probability outside the top k
    offsets       (examples + 1,) int64: where each example's positions start

Error bound: a stored top-k log-prob within `span` of the row's largest is off by at
most span / (2 * (2**bits - 1)): 3.05e-4 nats at 16 bits (span 40), 3.91e-3 at 12
bits (span 32), 0.0314 at 8 bits (span 16). One further below is stored as max - span, too high, but its probability
is below e**-span of the largest. The row's largest, the data token's log-prob and the
rest mass are float32 values of the teacher's float32 log-softmax (exact to float32).

With 32 "bits" the log-probs are stored as float32, unquantized (for checks, or when
space does not matter).

Bytes per position: k * id_bytes + k * bits / 8 + 12 (+ 8 per example for offsets).
At k = 32: 140 with 16-bit codes and a vocabulary up to 65536 (the default there);
156 with 12-bit codes and 3-byte ids for a larger vocabulary (the default there), 172 at
16 bits, 140 at 8 bits.

A shard is written to a temporary name and renamed, and the index is rewritten (also
through a rename) only after that, so a reader never sees a half-written shard: a shard
that the index does not list is ignored, and a listed one of the wrong size is refused.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "hpd-teacher-store"
VERSION = 1
INDEX = "index.json"
SPANS = {8: 16.0, 12: 32.0, 16: 40.0, 32: float("inf")}  # clipped range of max - lp; 32: float32, lossless
ARRAYS = ("ids", "codes", "max_logprob", "data_logprob", "rest_mass", "offsets")


class StoreError(ValueError):
    """A store that cannot be used as it is; the message says why and what to do."""


# ----------------------------------------------------------------------------- compact encodings


def id_bytes(vocab: int) -> int:
    """The fewest bytes per token id for a vocabulary of `vocab` tokens (2, 3 or 4)."""
    if vocab <= 1 << 16:
        return 2
    return 3 if vocab <= 1 << 24 else 4


def pack_ids(ids: np.ndarray, nbytes: int) -> np.ndarray:
    """(P, k) integer ids as stored: uint16, (P, 3k) uint8, or uint32."""
    ids = np.asarray(ids)
    if nbytes == 2:
        return ids.astype(np.uint16)
    if nbytes == 4:
        return ids.astype(np.uint32)
    raw = ids.astype("<u4").reshape(ids.shape + (1,)).view(np.uint8)  # (P, k, 4)
    return np.ascontiguousarray(raw[..., :3]).reshape(ids.shape[0], -1)


def unpack_ids(stored: np.ndarray, nbytes: int) -> np.ndarray:
    """Stored ids back to (P, k) int64."""
    if nbytes != 3:
        return stored.astype(np.int64)
    p = stored.shape[0]
    raw = np.zeros((p, stored.shape[1] // 3, 4), dtype=np.uint8)
    raw[..., :3] = stored.reshape(p, -1, 3)
    return raw.view("<u4")[..., 0].astype(np.int64)


@dataclass(frozen=True)
class Quantizer:
    """Top-k log-probs as distances below the row's largest, on 2**bits - 1 even steps."""

    bits: int = 16

    def __post_init__(self):
        if self.bits not in SPANS:
            raise StoreError(f"log-prob codes of {self.bits} bits: allowed {', '.join(map(str, SPANS))}")

    @property
    def span(self) -> float:
        return SPANS[self.bits]

    @property
    def step(self) -> float:
        return 0.0 if self.bits == 32 else self.span / ((1 << self.bits) - 1)

    @property
    def bound(self) -> float:
        """Largest error of a decoded log-prob within `span` of its row's largest."""
        return self.step / 2

    @property
    def dtype(self):
        return {8: np.uint8, 12: np.uint16, 16: np.uint16, 32: np.float32}[self.bits]

    def encode(self, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P, k) float log-probs -> ((P,) float32 row max, (P, k) codes)."""
        lp = np.asarray(logprobs, dtype=np.float64)
        top = lp.max(axis=-1) if lp.shape[-1] else np.zeros(lp.shape[:-1])
        if self.bits == 32:
            return top.astype(np.float32), lp.astype(np.float32)
        dist = np.clip(top[:, None] - lp, 0.0, self.span)
        codes = np.rint(dist / self.step).astype(self.dtype)
        return top.astype(np.float32), (pack12(codes) if self.bits == 12 else codes)

    def decode(self, top: np.ndarray, codes: np.ndarray, k: int | None = None) -> np.ndarray:
        """(P,) row max and codes as stored -> (P, k) float32 log-probs (k: needed at 12 bits)."""
        if self.bits == 32:
            return codes.astype(np.float32)
        if self.bits == 12:
            codes = unpack12(codes, k)
        return (top.astype(np.float64)[:, None] - codes.astype(np.float64) * self.step).astype(np.float32)


def pack12(codes: np.ndarray) -> np.ndarray:
    """(P, k) codes < 4096 -> (P, 3 * ceil(k / 2)) uint8, two codes in three bytes."""
    c = codes.astype(np.uint16)
    if c.shape[1] % 2:
        c = np.concatenate([c, np.zeros((c.shape[0], 1), np.uint16)], axis=1)
    a, b = c[:, 0::2], c[:, 1::2]
    out = np.stack([a & 0xFF, (a >> 8) | ((b & 0xF) << 4), b >> 4], axis=-1)
    return out.astype(np.uint8).reshape(c.shape[0], -1)


def unpack12(packed: np.ndarray, k: int) -> np.ndarray:
    t = packed.astype(np.uint16).reshape(packed.shape[0], -1, 3)
    a = t[..., 0] | ((t[..., 1] & 0xF) << 8)
    b = (t[..., 1] >> 4) | (t[..., 2] << 4)
    return np.stack([a, b], axis=-1).reshape(packed.shape[0], -1)[:, :k]


def default_bits(vocab: int) -> int:
    """16-bit codes where 2-byte ids leave room (140 bytes/position at k = 32), else 12
    (156 with 3-byte ids): both within 160 bytes at k = 32."""
    return 16 if id_bytes(vocab) == 2 else 12


def bytes_per_position(top_k: int, vocab: int, bits: int) -> int:
    """Stored bytes per target position, excluding the per-example offsets."""
    codes = 3 * -(-top_k // 2) if bits == 12 else top_k * bits // 8
    return top_k * id_bytes(vocab) + codes + 12


# ----------------------------------------------------------------------------- the index


def read_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    if not path.exists():
        raise StoreError(f"{folder}: no {INDEX}; not a teacher store (write one with `hpd cache-teacher`)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e.msg}); the index is damaged") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise StoreError(f"{path}: not an hpd teacher store index (format {FORMAT!r} expected)")
    if index.get("version") != VERSION:
        raise StoreError(f"{path}: store version {index.get('version')}; this hpd reads version {VERSION}")
    return index


def write_index(folder: Path, index: dict) -> None:
    """Atomically: a reader sees the old index or the new one, never a mix."""
    path = Path(folder) / INDEX
    tmp = path.with_name(INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def covered(index: dict) -> int:
    """Examples covered by the finished shards."""
    return index["shards"][-1]["examples"][1] if index["shards"] else 0


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def write_shard(folder: Path, index: dict, start: int, rows: list[dict[str, np.ndarray]],
                quantizer: Quantizer) -> dict:
    """Append a shard holding examples [start, start + len(rows)) and list it in the index.

    Each row holds one example's (P_i, k) `ids` and `logprobs` (top k, sorted descending)
    and (P_i,) `data_logprob` and `rest_mass`. Returns the updated index (also written).
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    if start != covered(index):
        raise StoreError(f"shard starts at example {start}, but the store covers {covered(index)}")
    counts = [len(r["data_logprob"]) for r in rows]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    k = int(index["top_k"])
    cat = {name: np.concatenate([r[name] for r in rows]) if rows else np.zeros((0,) + shape)
           for name, shape in (("ids", (k,)), ("logprobs", (k,)), ("data_logprob", ()), ("rest_mass", ()))}
    top, codes = quantizer.encode(cat["logprobs"].reshape(-1, k))
    tensors = {
        "ids": pack_ids(cat["ids"].reshape(-1, k), index["id_bytes"]),
        "codes": codes,
        "max_logprob": top,
        "data_logprob": cat["data_logprob"].astype(np.float32),
        "rest_mass": cat["rest_mass"].astype(np.float32),
        "offsets": offsets,
    }
    name = shard_name(len(index["shards"]))
    tmp = folder / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    _fsync(tmp)
    os.replace(tmp, folder / name)
    entry = {"file": name, "examples": [start, start + len(rows)], "positions": int(offsets[-1]),
             "bytes": (folder / name).stat().st_size}
    index = {**index, "shards": [*index["shards"], entry]}
    index["positions"] = sum(s["positions"] for s in index["shards"])
    index["complete"] = covered(index) >= index["examples"]
    write_index(folder, index)
    return index


def discard_unlisted(folder: Path, index: dict) -> list[str]:
    """Delete shard files (and temporaries) that the index does not list: a write that a
    kill interrupted. Returns their names."""
    listed = {s["file"] for s in index["shards"]}
    gone = []
    for p in sorted(Path(folder).iterdir()):
        torn = p.name.endswith(".tmp") or (p.name.startswith("shard-") and p.name.endswith(".safetensors")
                                          and p.name not in listed)
        if torn and p.is_file():
            p.unlink()
            gone.append(p.name)
    return gone


def is_store_file(name: str) -> bool:
    return name in (INDEX, INDEX + ".tmp") or (name.startswith("shard-") and
                                              name.endswith((".safetensors", ".safetensors.tmp")))


# ----------------------------------------------------------------------------- reading


class Store:
    """A finished store, opened for reading: rows of examples by their index in the data."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StoreError(f"teacher store {self.folder} does not exist")
        self.index = read_index(self.folder)
        if not self.index.get("complete"):
            raise StoreError(
                f"{self.folder}: the store covers {covered(self.index)} of {self.index['examples']} "
                "examples; finish it with `hpd cache-teacher ... --resume`"
            )
        for s in self.index["shards"]:
            path = self.folder / s["file"]
            if not path.exists():
                raise StoreError(f"{path}: shard missing; rebuild the store with `hpd cache-teacher`")
            size = path.stat().st_size
            if size != s["bytes"]:
                raise StoreError(f"{path}: shard is truncated or damaged ({size} bytes, the index says "
                                 f"{s['bytes']}); rebuild the store with `hpd cache-teacher`")
        self.quantizer = Quantizer(int(self.index["logprob_bits"]))
        self.top_k = int(self.index["top_k"])
        self.vocab = int(self.index["vocab"])
        self._starts = [s["examples"][0] for s in self.index["shards"]]
        self._open: dict[int, tuple] = {}

    @property
    def provenance(self) -> dict:
        return self.index["provenance"]

    @property
    def temperature(self) -> float:
        return float(self.provenance["temperature"])

    def _shard(self, number: int):
        if number not in self._open:
            from safetensors import safe_open

            path = self.folder / self.index["shards"][number]["file"]
            try:
                handle = safe_open(str(path), framework="numpy")
                offsets = handle.get_tensor("offsets")
            except Exception as e:  # safetensors raises its own error types for a damaged file
                raise StoreError(f"{path}: cannot read the shard ({e}); rebuild the store") from None
            self._open[number] = (handle, offsets)
        return self._open[number]

    def example(self, i: int) -> dict[str, np.ndarray]:
        """Example i's rows, decoded: ids (P, k) int64, logprobs (P, k) float32,
        data_logprob (P,), rest_mass (P,) float32."""
        if not 0 <= i < self.index["examples"]:
            raise StoreError(f"example {i} is outside the store (0 .. {self.index['examples'] - 1})")
        number = bisect.bisect_right(self._starts, i) - 1
        handle, offsets = self._shard(number)
        local = i - self._starts[number]
        a, b = int(offsets[local]), int(offsets[local + 1])
        part = {name: handle.get_slice(name)[a:b] for name in ARRAYS[:-1]}
        return {
            "ids": unpack_ids(part["ids"], self.index["id_bytes"]),
            "logprobs": self.quantizer.decode(part["max_logprob"], part["codes"], self.top_k),
            "data_logprob": part["data_logprob"].astype(np.float32),
            "rest_mass": part["rest_mass"].astype(np.float32),
        }

    def bytes_on_disk(self) -> int:
        return sum(s["bytes"] for s in self.index["shards"])


__all__ = ["Store", "StoreError", "Quantizer", "default_bits", "pack12", "unpack12", "id_bytes", "pack_ids",
           "unpack_ids", "bytes_per_position", "read_index", "write_index", "write_shard", "discard_unlisted",
           "covered", "is_store_file"]
