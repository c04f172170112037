"""Where a model comes from: a local folder or a hub id."""

from __future__ import annotations

import json
from pathlib import Path

ASSET_PREFIX = "hpd:"


def asset_path(path: str) -> str:
    """`hpd:tiny/teacher` names a file shipped inside the package (hpd/assets/...);
    any other path is returned as it is."""
    if isinstance(path, str) and path.startswith(ASSET_PREFIX):
        return str(Path(__file__).resolve().parent.parent / "assets" / path[len(ASSET_PREFIX):])
    return path


def local_or_hub(path: str) -> Path | str:
    """A local model folder (Path), or a hub id such as `Qwen/Qwen2.5-1.5B` (str).

    A path that exists but is no model folder, or that looks local and is missing,
    fails with a clear FileNotFoundError."""
    path = asset_path(path)
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} exists but holds no config.json: not a model folder")
        return p
    if not path or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    from hpd.files.hub import resolve_hub_model

    return resolve_hub_model(path)


def hub_failure(path: str, error: Exception) -> FileNotFoundError:
    return FileNotFoundError(f"{path!r} is not a local folder, and loading it as a hub id failed: {error}")


# Weight files hpd hands to a loader: safetensors only. A pickle (pytorch_model.bin, *.pt)
# can run code when loaded, so it is never opened, however restricted the unpickler.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weights of a local model folder, checked before a loader opens them:
    present, whole (not truncated), and, through an index, inside the folder."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    files = index_files(folder, index) if index.exists() else sorted(folder.glob("model*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = (f"; {', '.join(pickles)} is not loaded (a pickle can run code): convert it to "
                "safetensors first") if pickles else ""
        raise FileNotFoundError(f"{folder}: no safetensors weights (model*.safetensors){hint}")
    for f in files:
        check_safetensors(f)
    return files


def index_files(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to file names")
    files = []
    for name in sorted(set(weight_map.values())):
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not name.endswith(".safetensors"):
            raise ValueError(f"{index}: weight_map names {name!r}, which is not a safetensors file "
                             "inside the folder; refusing to follow it")
        if not (folder / rel).is_file():
            raise FileNotFoundError(f"{index}: weight_map names {name}, which does not exist")
        files.append(folder / rel)
    return files


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors all lie within the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise ValueError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(fh.read(n))
            end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated ({size} bytes; its header describes {8 + n + end})")
