"""Where rows come from: JSONL, JSON arrays, Parquet, `datasets.save_to_disk` folders and hub
dataset ids.

`read_rows(spec)` gives `(where, row)` pairs, each row already in one of hpd's shapes
(hpd.data.formats). `where` is what an error names: `file:line` for JSONL and JSON arrays,
`file:row N` for Parquet, `name:split:index` for `datasets` data. Parquet needs pyarrow
and `datasets` folders and hub ids need `datasets` (the `data` extra); both are
imported only when such data is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from hpd.data.examples import DataError, read_jsonl
from hpd.data.formats import normalize, parse_columns

SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".csv", ".txt")
EXTRA = "pip install 'hpd-distill[data]'"


def read_rows(spec: str | Path, *, split: str = "", columns=None,
              default_splits: tuple[str, ...] = ("train",)) -> list[tuple[str, dict]]:
    """Every row of `spec`, normalized; the first bad one raises DataError naming where it is.

    `split` chooses a split of a `datasets` folder or hub id; empty picks the only split,
    else the first of `default_splits` present, else fails listing the splits."""
    mapping = parse_columns(columns)
    out = []
    for where, row in raw_rows(spec, split=split, default_splits=default_splits):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        try:
            out.append((where, normalize(row, mapping)))
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
    if not out:
        raise DataError(f"{spec}: the data holds no rows")
    return out


def raw_rows(spec: str | Path, *, split: str = "",
             default_splits: tuple[str, ...] = ("train",)) -> Iterable[tuple[str, object]]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return _saved_dataset(path, split, default_splits)
    if path.is_file():
        if split:
            raise DataError(f"{path}: --data-split applies to `datasets` folders and hub ids, not to a file")
        suffix = path.suffix.lower()
        if suffix in (".parquet", ".pq"):
            return _parquet(path)
        if suffix == ".json" and _first_char(path) == "[":
            return _json_array(path)
        return [(f"{path}:{n}", row) for n, row in read_jsonl(path)]
    if looks_local(str(spec)):
        raise DataError(f"data file {spec} does not exist")
    return _hub_dataset(str(spec), split, default_splits)


def fingerprint(spec: str | Path) -> str:
    """sha256 of a data file, or of a folder's files in name order; a hub id has none of its own."""
    import hashlib

    from hpd.files.digest import sha256_of

    path = Path(spec).expanduser()
    if path.is_file():
        return sha256_of(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_of(p).encode())
        return h.hexdigest()
    return "hub dataset (no local file)"


def looks_local(spec: str) -> bool:
    """A path people write for a file (not an `owner/name` hub id)."""
    return (not spec or spec.startswith((".", "/", "~")) or spec.lower().endswith(SUFFIXES)
            or spec.count("/") > 1 or os.sep != "/" and os.sep in spec)


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8") as fh:
        while True:
            block = fh.read(4096)
            if not block:
                return ""
            stripped = block.lstrip()
            if stripped:
                return stripped[0]


def _json_array(path: Path) -> list[tuple[str, object]]:
    """A top-level JSON array, element by element, so each row keeps its line number."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    def fail(i: int, msg: str):
        line = line_of(i)
        col = i - (text.rfind("\n", 0, i) + 1) + 1
        raise DataError(f"{path}:{line}: not valid JSON ({msg} at column {col})")

    i = text.index("[") + 1
    rows = []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "]" and not rows:
            break
        try:
            row, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        rows.append((f"{path}:{line_of(i)}", row))
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "]":
            break
        if i >= len(text) or text[i] != ",":
            fail(i, "expected ',' or ']' between rows")
        i += 1
    if text[i + 1:].strip():
        fail(i + 1, "extra data after the array")
    return rows


def _parquet(path: Path) -> list[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow ({EXTRA})") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return [(f"{path}:row {i}", row) for i, row in enumerate(table.to_pylist())]


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the `datasets` library ({EXTRA})") from None
    return datasets


def _saved_dataset(path: Path, split: str, default_splits) -> list[tuple[str, object]]:
    if not any((path / name).exists() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk")
    datasets = _import_datasets(f"reading {path}")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: datasets could not load it ({e})") from None
    return _dataset_rows(str(path), loaded, split, default_splits)


def _hub_dataset(name: str, split: str, default_splits) -> list[tuple[str, object]]:
    from hpd.files.hub import hub_unreachable

    datasets = _import_datasets(f"{name!r} (not a local file, so read as a hub dataset id)")
    reason = hub_unreachable()
    try:
        if reason:  # only a cached copy can answer: no retries against an absent network
            datasets.config.HF_HUB_OFFLINE = True
        loaded = datasets.load_dataset(name, split=split or None)
    except DataError:
        raise
    except Exception as e:
        where = f" and the hub is unreachable ({reason})" if reason else ""
        raise DataError(f"{name!r} is not a local file{where}; loading it as a hub dataset failed: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return _dataset_rows(name, loaded, split, default_splits)


def _dataset_rows(name: str, loaded, split: str, default_splits) -> list[tuple[str, object]]:
    if isinstance(loaded, dict):  # a DatasetDict: one split is read
        splits = list(loaded.keys())
        if split:
            if split not in splits:
                raise DataError(f"{name}: no split {split!r}; the splits are {', '.join(splits)}")
        elif len(splits) == 1:
            split = splits[0]
        else:
            split = next((s for s in default_splits if s in splits), "")
            if not split:
                raise DataError(f"{name}: several splits ({', '.join(splits)}); choose one with --data-split")
        loaded = loaded[split]
    label = split or str(getattr(loaded, "split", None) or "data")
    return [(f"{name}:{label}:{i}", row) for i, row in enumerate(loaded)]
