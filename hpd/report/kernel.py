"""Linux's own isolation for the code sandbox (`hpd.report.sandbox`): the mount and network
namespaces that confine a program where bubblewrap is missing, and the pids cgroup that bounds its
processes, root's included (RLIMIT_NPROC does not apply to root).

`confine` and `join` run in the forked child between fork and exec; the libc functions are looked
up in the parent (`libc`) so the child does as little as it can. The cgroup is made and removed by
the parent.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import secrets
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REMOUNT = 1024, 2048, 4096, 32
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
_CAPABILITY_V3 = 0x20080522
# where a program's temporary files would land outside its folder: each gets a fresh tmpfs
PRIVATE_TMP = ("/tmp", "/dev/shm")
TMP_SIZE = 64 * 2**20
TMPFS_OPTIONS = f"mode=1777,size={TMP_SIZE}".encode()
CGROUP_PREFIX = "hpd-code-"


@functools.cache
def libc():
    """libc through ctypes, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError):
        return None


@functools.cache
def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


def prepare() -> bool:
    """Look up what the child will need (libc, the capability count) in the parent; False off Linux."""
    _last_capability()
    return libc() is not None


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: bytes | None, target: str, fstype: bytes | None, flags: int, data: bytes | None = None):
    _check(libc().mount(source, os.fsencode(target), fstype, flags, data), f"mount {target}")


def _flags_of(path: str) -> int:
    """The per-mount flags a remount of `path` must keep (a user namespace may not drop them)."""
    f = os.statvfs(path).f_flag
    kept = f & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    return kept | (MS_RELATIME if f & os.ST_RELATIME else 0)


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        # field 5 is the mount point, with space, tab, newline and backslash written in octal
        points = [line.split()[4] for line in f]
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p) for p in points]


def _read_only_everywhere() -> None:
    for point in _mount_points():
        try:
            _mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _flags_of(point))
        except OSError:
            try:  # a mount the program cannot reach, or one already read-only, is no way out
                writable = not os.statvfs(point).f_flag & os.ST_RDONLY
            except OSError:
                continue
            if writable:
                raise


def _map_user(uid: int, gid: int) -> None:
    """Map the user to itself in the new user namespace: exec then drops the capabilities."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _drop_capabilities() -> None:
    """Root keeps its uid but loses every capability, so it cannot remount the root writable."""
    lib = libc()
    for cap in range(_last_capability() + 1):
        lib.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_V3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: empty, twice (64 bits)
    _check(lib.capset(header, data), "capset")


def confine(folder: str, keep: tuple[str, ...] | list[str] = ()) -> None:
    """In the child: new mount and network namespaces (and a user namespace when not root), every
    mount read-only, a fresh tmpfs on /tmp and /dev/shm, `folder` writable at its own path, the
    folders `keep` (the interpreter's, where a fresh /tmp would hide it) read-only at theirs, no
    capabilities, no new privileges. Raises OSError when any step fails."""
    lib, uid, gid = libc(), os.getuid(), os.getgid()
    _check(lib.unshare(CLONE_NEWNS | CLONE_NEWNET | (0 if uid == 0 else CLONE_NEWUSER)), "unshare")
    if uid != 0:
        _map_user(uid, gid)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here may reach the host's mounts
    # handles on what the fresh tmpfs will cover, bound back at their own paths after it
    handles = [os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for path in (folder, *keep)]
    try:
        _read_only_everywhere()
        for tmp in PRIVATE_TMP:
            if os.path.isdir(tmp):
                _mount(b"tmpfs", tmp, b"tmpfs", MS_NOSUID | MS_NODEV, TMPFS_OPTIONS)
        for path, handle, writable in zip((folder, *keep), handles, (True,) + (False,) * len(keep)):
            os.makedirs(path, exist_ok=True)  # in the fresh /tmp when the path was under it
            _mount(f"/proc/self/fd/{handle}".encode(), path, None, MS_BIND)
            _mount(None, path, None, MS_BIND | MS_REMOUNT | (0 if writable else MS_RDONLY) | _flags_of(path))
    finally:
        for handle in handles:
            os.close(handle)
    os.chdir(folder)  # the working directory was entered through the old, now read-only, mount
    _check(lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if uid == 0:
        _drop_capabilities()


# ---------------------------------------------------------------- the pids cgroup


def _hierarchies() -> list[tuple[str, str]]:
    """(mount point, this process's cgroup path) of the v1 pids hierarchy and the v2 one."""
    with open("/proc/self/cgroup") as f:
        mine = {}
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                mine[c] = path
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
            root, point = fields[3], fields[4]
            key = "pids" if fstype == "cgroup" and "pids" in options else "" if fstype == "cgroup2" else None
            if key is not None and key in mine:
                path = mine[key]
                if path.startswith(root):
                    found.append((point, path[len(root):].lstrip("/")))
    return found


@functools.cache
def pids_parent() -> str | None:
    """The pids cgroup folder this process may make children in; None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        hierarchies = _hierarchies()
    except (OSError, ValueError, IndexError):
        return None
    for point, path in hierarchies:
        base = os.path.join(point, path)
        control = os.path.join(base, "cgroup.subtree_control")
        try:
            if os.path.exists(control):  # v2: a child has pids.max only where its parent hands pids down
                with open(control) as f:
                    if "pids" not in f.read().split():
                        continue
            if os.access(base, os.W_OK):
                return base
        except OSError:
            continue
    return None


def make_pids_cgroup(limit: int) -> str | None:
    """A new cgroup holding at most `limit` tasks (processes and threads); None where none can be made."""
    parent = pids_parent()
    if parent is None:
        return None
    path = os.path.join(parent, f"{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.mkdir(path)
    except OSError:
        return None
    try:
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(limit))
    except OSError:
        os.rmdir(path)
        return None
    return path


def join(cgroup: str) -> None:
    """In the child: move this process into `cgroup`, so everything it starts is counted there."""
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def remove_cgroup(cgroup: str, wait_s: float = 5.0) -> None:
    """Kill whatever is left in `cgroup` (a child that left the process group included), then remove it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(os.path.join(cgroup, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.rmdir(cgroup)
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
