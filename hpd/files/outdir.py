"""The output folder: what hpd wrote there (a manifest), and who is writing it (a lock).

`--overwrite` deletes only what the manifest says an earlier run or export wrote, and
refuses, naming the file, when anything else is there: a file the user added, or one of
hpd's files changed since (its size or modification time differ). A folder inside that
hpd created whole (a checkpoint) is listed as a folder.

One run writes a folder at a time: a second one fails with a message naming the process
that holds it. The lock is an OS file lock (`fcntl.flock`), which the kernel releases
when its holder dies, so a killed run never leaves a lock that blocks `--resume`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "hpd_manifest.json"
LOCK = ".hpd.lock"
_OWN = {MANIFEST, LOCK}
# files hpd keeps appending to: owned by name, whatever their size
APPENDED = ("metrics.jsonl", "config_history.jsonl")


class OutputError(ValueError):
    """--out cannot be used (not a folder, not writable)."""


class OutputBusy(FileExistsError):
    """Another process is writing --out."""


def make_dir(folder: Path) -> Path:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {folder}: cannot create the folder ({e.strerror or e})") from None
    return folder


def _stat(path: Path) -> list[int] | None:
    if path.name in APPENDED:
        return None
    st = path.lstat()
    return [st.st_size, st.st_mtime_ns]


class Manifest:
    """hpd_manifest.json: {"files": {relative path: [size, mtime_ns] | null}, "folders": [...]}."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self.files: dict[str, list[int] | None] = {}
        self.folders: set[str] = set()
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.files = {str(k): v for k, v in dict(data.get("files", {})).items()}
                self.folders = {str(f) for f in data.get("folders", [])}
            except (ValueError, TypeError, AttributeError):
                # an unreadable manifest vouches for nothing: every file counts as foreign
                self.files, self.folders = {}, set()

    def save(self) -> None:
        tmp = self.path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"files": self.files, "folders": sorted(self.folders)}, indent=1))
        os.replace(tmp, self.path)

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.folder).as_posix()

    def record(self, *paths: Path) -> None:
        for p in paths:
            self.files[self.rel(p)] = _stat(Path(p))
        self.save()

    def own_folder(self, path: Path) -> None:
        self.folders.add(self.rel(path))
        self.save()

    def drop_folder(self, path: Path) -> None:
        self.folders.discard(self.rel(path))
        self.save()

    @contextmanager
    def recording(self):
        """Record every file that the block creates or changes."""
        before = {p: _stat_any(p) for p in self.entries()}
        yield
        changed = [p for p in self.entries() if before.get(p) != _stat_any(p) and not self.in_own_folder(p)]
        if changed:
            self.record(*changed)

    def entries(self) -> list[Path]:
        """Every file and link below the folder (links are not followed), but not hpd's own
        bookkeeping files."""
        found = []
        for root, dirs, files in os.walk(self.folder):
            here = Path(root)
            for name in files:
                if here == self.folder and (name in _OWN or name == MANIFEST + ".tmp"):
                    continue
                found.append(here / name)
            for name in list(dirs):
                if (here / name).is_symlink():
                    found.append(here / name)
                    dirs.remove(name)
        return sorted(found)

    def in_own_folder(self, path: Path) -> bool:
        parts = Path(self.rel(path)).parts
        return any("/".join(parts[:i]) in self.folders for i in range(1, len(parts)))

    def owns(self, path: Path) -> bool:
        if self.in_own_folder(path):
            return True
        rel = self.rel(path)
        if rel not in self.files:
            return False
        saved = self.files[rel]
        return saved is None or _stat(path) == saved

    def foreign(self) -> list[str]:
        return [self.rel(p) for p in self.entries() if not self.owns(p)]

    def clear(self) -> None:
        """Delete what the manifest lists (all of it hpd's, checked by the caller)."""
        for p in self.entries():
            if p.is_symlink() or p.is_file():
                p.unlink()
        for root, dirs, _ in os.walk(self.folder, topdown=False):
            for name in dirs:
                d = Path(root) / name
                if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
                    d.rmdir()
        self.files, self.folders = {}, set()
        self.save()


def _stat_any(path: Path):
    st = path.lstat()
    return (st.st_size, st.st_mtime_ns)


def check_writable(folder: Path, overwrite: bool) -> None:
    """Raise unless `folder` is missing, empty, or (with overwrite) holds only what hpd
    recorded writing. Writes nothing, so a refused folder is left exactly as it was."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file, not a folder")
    if not folder.exists():
        return
    manifest = Manifest(folder)
    if not manifest.entries():
        return
    if not overwrite:
        raise FileExistsError(f"{folder} is not empty; pass --overwrite to replace it")
    foreign = manifest.foreign()
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(f"{folder} holds files hpd did not write or that changed since ({shown}); "
                              "--overwrite only replaces what an earlier run or export recorded writing. "
                              "Move them or choose another folder")


def ensure_writable(folder: Path, overwrite: bool) -> Manifest:
    """Never write into a non-empty folder unless asked to, and never delete a file that
    an hpd run or export did not write, even when asked to."""
    check_writable(folder, overwrite)
    folder = make_dir(folder)
    manifest = Manifest(folder)
    if manifest.entries():
        manifest.clear()
    return manifest


class OutputLock:
    """An exclusive lock on a folder for one run, naming its holder."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.fh = None

    def acquire(self) -> OutputLock:
        try:
            fh = open(self.path, "a+")
        except OSError as e:
            raise OutputError(f"--out {self.path.parent}: cannot write there ({e.strerror or e})") from None
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): a holder that is still alive blocks
            if _alive(_holder(self.path).get("pid")):
                fh.close()
                raise self._busy() from None
        except OSError:
            fh.close()
            raise self._busy() from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        fh.flush()
        self.fh = fh
        return self

    def _busy(self) -> OutputBusy:
        h = _holder(self.path)
        who = f"process {h.get('pid', '?')} on {h.get('host', '?')}"
        if h.get("command"):
            who += f" ({h['command']})"
        since = f", since {h['since']}" if h.get("since") else ""
        return OutputBusy(f"{self.path.parent} is being written by {who}{since}; wait for it to finish "
                          "or stop it, then --resume")

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()  # closing drops the flock
            self.fh = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def remove_if_untouched(folder: Path) -> None:
    """Remove a folder this run created when it holds nothing but hpd's bookkeeping (the
    lock, the manifest): a run that failed before writing anything leaves nothing behind."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir()}
    if not names <= _OWN:
        return
    for name in names:
        (folder / name).unlink()
    folder.rmdir()


def _holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["Manifest", "OutputLock", "OutputBusy", "OutputError", "check_writable", "ensure_writable", "make_dir"]
