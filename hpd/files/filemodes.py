"""File modes that follow the umask.

safetensors (and so transformers' save_pretrained) writes through a private temporary
file that keeps mode 0600 after its rename, while every other file gets 0666 & ~umask.
After writing a folder, its files get the mode the umask gives.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: put it back at once
    os.umask(mask)
    return mask


def respect_umask(folder: str | Path, *, recursive: bool = True) -> None:
    """chmod the regular files in `folder` to 0666 & ~umask (executable bits are kept)."""
    umask = current_umask()
    files = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    for path in files:
        if path.is_file() and not path.is_symlink():
            old = stat.S_IMODE(path.stat().st_mode)
            want = (0o666 | (old & 0o111)) & ~umask
            if old != want:
                os.chmod(path, want)
