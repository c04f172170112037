"""Where a model comes from: a local folder or a hub id."""

from __future__ import annotations

from pathlib import Path


ASSET_PREFIX = "hpd:"


def asset_path(path: str) -> str:
    """`hpd:tiny/teacher` names a file shipped inside the package (hpd/assets/...);
    any other path is returned as it is."""
    if isinstance(path, str) and path.startswith(ASSET_PREFIX):
        return str(Path(__file__).resolve().parent / "assets" / path[len(ASSET_PREFIX):])
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
    from hpd.hub import resolve_hub_model

    return resolve_hub_model(path)


def hub_failure(path: str, error: Exception) -> FileNotFoundError:
    return FileNotFoundError(f"{path!r} is not a local folder, and loading it as a hub id failed: {error}")
