"""The sandbox that runs the code metric's programs (`hpd.report.scoring.run_code`).

Always, each program runs
- in a fresh ``python -I -S -B`` (no PYTHON* variables, no user site, no site-packages, no
  bytecode written, the script's folder not on sys.path), stdin from /dev/null;
- in a fresh temporary folder, its working directory (PWD), HOME and TMPDIR, removed afterwards;
  the environment holds only PATH, HOME, TMPDIR, PWD and LANG;
- under limits set in the child before exec: RLIMIT_AS ``memory_mb``, RLIMIT_CPU about the
  timeout, RLIMIT_FSIZE 16 MiB (stdout and stderr go to files in the folder, so these bound the
  output too), RLIMIT_NPROC 256 (root is exempt from it), RLIMIT_CORE 0;
- in a new session whose whole process group is killed with SIGKILL at the wall-clock timeout
  and after the program ends.

Around that, the layers (`LAYERS`), each used where this machine has it (`layer_status`):
- ``bwrap``: bubblewrap (Debian's ``bubblewrap``) with the root bound read-only, a fresh /tmp
  and /dev, only the program's folder writable, new user, PID, network (a loopback of its own),
  IPC and UTS namespaces, no capabilities, and death with its parent;
- ``namespaces``, where bwrap is missing or cannot run: the kernel's namespaces directly
  (`hpd.report.kernel.confine`): every mount read-only, a fresh tmpfs on /tmp and /dev/shm, the
  folder writable, a network namespace whose loopback is down, no capabilities; no PID namespace;
- ``cgroup``: a pids cgroup of the program's own, at most `CGROUP_PROCESS_LIMIT` tasks for root
  too; whatever is left in it at the end is killed, a child that left the process group included;
- ``guard``: `hpd.report.guard`, in the child before the program, on every machine.

`isolation` reports which layers hold here, measured from a child; `describe` says it in a line.
``preexec_fn`` is not safe in a process with other threads, so run the programs from one thread.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hpd.report import kernel

LAYERS = ("bwrap", "namespaces", "cgroup", "guard")
FLAGS = ("-I", "-S", "-B")
ENVIRONMENT = ("HOME", "LANG", "PATH", "PWD", "TMPDIR")
OUTPUT_LIMIT = 16 * 2**20  # RLIMIT_FSIZE: any one file the program writes, its output included
PROCESS_LIMIT = 256  # RLIMIT_NPROC (counted per user, so not lower)
CGROUP_PROCESS_LIMIT = 128  # tasks in the program's own cgroup: its processes and threads
TMP_SIZE = kernel.TMP_SIZE  # bytes the private /tmp holds
_TAIL = 8192  # bytes of stdout and stderr kept
# without the guard, the child runs the program as the guard's last lines do
_BARE = "import runpy, sys\ndel sys.argv[0]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"


@dataclass(frozen=True)
class Outcome:
    returncode: int  # negative: killed by that signal
    timed_out: bool
    stdout: str  # the last 8 KiB
    stderr: str


@functools.cache
def _guard_source() -> str:
    return Path(__file__).with_name("guard.py").read_text(encoding="utf-8")


@functools.cache
def _bwrap() -> str | None:
    return shutil.which("bwrap")


@functools.cache
def _bwrap_sizes_tmpfs() -> bool:
    """Whether this bwrap takes --size (0.5 and later): the fresh /tmp then holds 64 MiB at most."""
    try:
        found = subprocess.run([_bwrap(), "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--size" in found.stdout + found.stderr


def interpreter() -> str:
    """The Python that runs a program: the file behind this process's (a virtual environment's
    python is a link to it). The program runs isolated (-I -S), so it needs nothing else of
    the environment: the interpreter and its standard library."""
    return os.path.realpath(sys.executable)


def hidden_by_private_tmp() -> list[str]:
    """The interpreter's installation where a private /tmp would hide it (a clone built under
    /tmp, as CI does): bound back read-only inside the sandbox."""
    base = os.path.realpath(sys.base_prefix)
    return [base] if any(base == tmp or base.startswith(tmp + "/") for tmp in kernel.PRIVATE_TMP) else []


def _bwrap_args(folder: str) -> list[str]:
    size = ["--size", str(TMP_SIZE)] if _bwrap_sizes_tmpfs() else []
    keep = [arg for path in hidden_by_private_tmp() for arg in ("--ro-bind", path, path)]
    return [_bwrap(), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *size, "--tmpfs", "/tmp", *keep,
            "--bind", folder, folder, "--unshare-all", "--cap-drop", "ALL", "--die-with-parent",
            "--new-session", "--chdir", folder, "--"]


def _child_setup(folder: str, timeout_s: float, memory_mb: int, cgroup: str | None, confine: bool):
    import resource

    if confine:
        kernel.prepare()  # here, not in the forked child
    keep = hidden_by_private_tmp()
    cpu = math.ceil(timeout_s) + 1
    limits = [("RLIMIT_AS", memory_mb * 2**20, memory_mb * 2**20), ("RLIMIT_CPU", cpu, cpu + 1),
              ("RLIMIT_FSIZE", OUTPUT_LIMIT, OUTPUT_LIMIT), ("RLIMIT_NPROC", PROCESS_LIMIT, PROCESS_LIMIT),
              ("RLIMIT_CORE", 0, 0)]
    limits = [(getattr(resource, name), soft, hard) for name, soft, hard in limits if hasattr(resource, name)]

    def setup():  # in the child, between fork and exec
        try:
            if cgroup is not None:
                kernel.join(cgroup)
            if confine:
                kernel.confine(folder, keep)
        except OSError as e:  # the parent reads why from the program's stderr file
            os.write(2, f"hpd code sandbox: {e}\n".encode())
            raise
        for which, soft, hard in limits:
            try:
                _, old_hard = resource.getrlimit(which)
                if old_hard != resource.RLIM_INFINITY:
                    soft, hard = min(soft, old_hard), min(hard, old_hard)
                resource.setrlimit(which, (soft, hard))
            except (ValueError, OSError):
                pass

    return setup


def _wait_then_kill_group(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to timeout_s without reaping, kill the group, reap. True if it ran out of time.

    The leader stays a zombie until reaped, so its group id cannot have been reused."""
    deadline = time.monotonic() + timeout_s
    delay, timed_out = 0.001, False
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            timed_out = True
            break
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    return timed_out


def _remove(folder: str) -> None:
    for root, dirs, _ in os.walk(folder):  # a program may leave folders it cannot list
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(folder, ignore_errors=True)


def _tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - _TAIL))
        return f.read().decode("utf-8", "replace")


def _execute(program: str, timeout_s: float, memory_mb: int, layers: frozenset[str]) -> Outcome:
    folder = os.path.realpath(tempfile.mkdtemp(prefix="hpd-code-"))  # bound at this path in the sandbox
    cgroup = kernel.make_pids_cgroup(CGROUP_PROCESS_LIMIT) if "cgroup" in layers else None
    try:
        if "cgroup" in layers and cgroup is None:
            raise RuntimeError("the code sandbox could not make a pids cgroup; run without the cgroup layer")
        path, out_path, err_path = (os.path.join(folder, name) for name in ("solution.py", ".stdout", ".stderr"))
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        argv = [interpreter(), *FLAGS, "-c", _guard_source() if "guard" in layers else _BARE, path]
        if "bwrap" in layers:
            argv = _bwrap_args(folder) + argv
        # PWD too, which bwrap would set anyway: the same five variables whatever the layers
        env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "PWD": folder, "LANG": "C.UTF-8"}
        setup = _child_setup(folder, timeout_s, memory_mb, cgroup, "namespaces" in layers and "bwrap" not in layers)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(argv, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err, close_fds=True, start_new_session=True, preexec_fn=setup)
            except subprocess.SubprocessError:
                raise RuntimeError(f"the code sandbox could not start a program with layers {sorted(layers)}: "
                                   f"{_tail(err_path).strip() or 'no reason given'}") from None
            timed_out = _wait_then_kill_group(proc, timeout_s)
        code = proc.returncode
        if "bwrap" in layers and 128 < code < 128 + signal.NSIG:
            code = 128 - code  # bwrap reports a program killed by signal N as exit status 128 + N
        return Outcome(code, timed_out, _tail(out_path), _tail(err_path))
    finally:
        if cgroup is not None:  # kills what the group kill missed: a child that left the group
            kernel.remove_cgroup(cgroup)
        _remove(folder)


def _probe(layer: str, program: str) -> str | None:
    """None where `program` exits 0 under `layer` alone, else why not."""
    try:
        outcome = _execute(program, 30.0, 512, frozenset({layer}))
    except (RuntimeError, OSError) as e:
        return str(e)
    if outcome.returncode == 0:
        return None
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    return f"cannot run here: {lines[-1] if lines else f'exit status {outcome.returncode}'}"


@functools.cache
def layer_status() -> dict[str, str | None]:
    """Each layer: None where it works on this machine, else the reason it does not."""
    status = {"bwrap": "not installed (Debian: apt-get install bubblewrap)", "guard": None,
              "namespaces": "needs Linux", "cgroup": "no pids cgroup this process may make children in "
                                                     "(cgroup v1's pids hierarchy, or v2 with pids delegated)"}
    if _bwrap() is not None:
        status["bwrap"] = _probe("bwrap", "pass")
    if kernel.libc() is not None:
        status["namespaces"] = _probe("namespaces", "import os\nassert os.statvfs('/').f_flag & os.ST_RDONLY\n")
    if kernel.pids_parent() is not None:
        status["cgroup"] = _probe("cgroup", "pass")
    return status


def default_layers() -> frozenset[str]:
    """Every layer that works here; the namespaces only where bwrap does not."""
    working = {name for name, why in layer_status().items() if why is None}
    if "bwrap" in working:
        working.discard("namespaces")
    return frozenset(working)


def run(program: str, *, timeout_s: float, memory_mb: int, layers: Iterable[str] | None = None) -> Outcome:
    """Run a Python program in the sandbox with `layers` (default: `default_layers`)."""
    if layers is None:
        return _execute(program, timeout_s, memory_mb, default_layers())
    layers = frozenset(layers)
    for name in sorted(layers):
        if name not in LAYERS:
            raise ValueError(f"unknown sandbox layer {name!r}; allowed: {', '.join(LAYERS)}")
        why = layer_status()[name]
        if why is not None:
            raise ValueError(f"the sandbox layer {name!r} does not work here: {why}")
    return _execute(program, timeout_s, memory_mb, layers)


_PROBE = """
import json, os, resource
def ns(kind):
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return None
names = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE")
limits = {n: resource.getrlimit(getattr(resource, n))[0] for n in names if hasattr(resource, n)}
with open("/proc/self/status") as f:
    caps = [line.split()[1] for line in f if line.startswith("CapEff")]
print(json.dumps({"ns": {k: ns(k) for k in ("net", "user", "mnt", "pid")}, "limits": limits,
                  "read_only_root": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
                  "tmp_device": os.stat("/tmp").st_dev, "capabilities": int(caps[0], 16) if caps else None}))
"""


def isolation(layers: Iterable[str] | None = None) -> dict:
    """Which of the sandbox's measures hold here, read from a child started as `run` starts one
    with its default limits (and `layers`, default: every layer that works here)."""
    return _isolation(default_layers() if layers is None else frozenset(layers))


@functools.cache
def _isolation(layers: frozenset[str]) -> dict:
    import resource

    def ns(kind):
        try:
            return os.readlink(f"/proc/self/ns/{kind}")
        except OSError:
            return None

    outcome = run(_PROBE, timeout_s=5.0, memory_mb=512, layers=layers)
    child = json.loads(outcome.stdout or "{}")
    spaces = {kind: child.get("ns", {}).get(kind) not in (None, ns(kind)) for kind in ("net", "user", "mnt", "pid")}
    limits = {name: (None if value == resource.RLIM_INFINITY else value)
              for name, value in child.get("limits", {}).items()}
    root = os.geteuid() == 0
    if "cgroup" in layers:
        process_limit = f"cgroup: {CGROUP_PROCESS_LIMIT} tasks"
    else:
        process_limit = None if root or "RLIMIT_NPROC" not in limits else f"RLIMIT_NPROC: {limits['RLIMIT_NPROC']}"
    return {
        "interpreter": f"{interpreter()} {' '.join(FLAGS)}",
        "temporary_directory": True,
        "environment": list(ENVIRONMENT),
        "rlimits": limits,
        "layers": [name for name in LAYERS if name in layers],
        "unavailable": {name: why for name, why in layer_status().items() if why is not None},
        "read_only_root": bool(child.get("read_only_root")),
        "private_tmp": child.get("tmp_device") not in (None, os.stat("/tmp").st_dev),
        "mount_namespace": spaces["mnt"],
        "network_namespace": spaces["net"],
        "user_namespace": spaces["user"],
        "pid_namespace": spaces["pid"],
        "capabilities_dropped": child.get("capabilities") == 0,
        "process_limit": process_limit,
        "nproc_enforced": process_limit is not None,
        "process_group_kill": True,
        "guard": "guard" in layers,
        "socket_guard": "guard" in layers,
    }


def describe(report: dict) -> str:
    """One line on the layers that hold here, from an `isolation` report: `hpd eval`'s start line."""
    holds = []
    if report["read_only_root"]:
        fs = "bwrap" if "bwrap" in report["layers"] else "namespaces"
        found = [("read-only root", True), ("private /tmp", report["private_tmp"]),
                 ("no network", report["network_namespace"]), ("own PID namespace", report["pid_namespace"]),
                 ("no capabilities", report["capabilities_dropped"])]
        holds.append(f"{fs} ({', '.join(what for what, ok in found if ok)})")
    holds.append(report["process_limit"] or "no process limit (root: fork loops end at the timeout)")
    if report["guard"]:
        holds.append("guard (no changes outside the run's folder, no signals to others, no programs, no sockets)")
    line = "code sandbox: " + "; ".join(holds)
    missing = dict(report["unavailable"])
    if "bwrap" in report["layers"]:
        missing.pop("namespaces", None)
    elif "namespaces" in report["layers"]:
        missing.pop("bwrap", None)
    if missing:
        line += "; not here: " + "; ".join(f"{name}: {why}" for name, why in missing.items())
    return line
