"""The code sandbox (hpd.report.sandbox) against hostile and careless programs.

Each hostile program in CASES tries one harm; afterwards the test looks for its trace. With
every layer this machine has, each must fail and leave none. Then each layer is proved on its
own against the harms it claims (CLAIMS), skipped with the reason where this machine lacks it;
and a control run with no layer at all shows the harms are real (the checks can fail).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from hpd.report import sandbox
from hpd.report.guard import MESSAGE
from hpd.report.scoring import CodeResult, run_code

REPO = Path(__file__).resolve().parent.parent
SECRET = "HPD_SANDBOX_SECRET"


@dataclass
class Target:
    """What a hostile program aims at: files and folders outside its own, processes, a server."""

    token: str
    victim_dir: Path  # a folder in the project, holding `victim`
    victim: Path
    process: subprocess.Popen  # a process of the same user
    server: socket.socket  # listening on 127.0.0.1 outside the sandbox
    signals: list = field(default_factory=list)  # SIGUSR1s this (the hpd) process received

    @property
    def marks(self) -> dict[str, Path]:
        name = f"hpd-{self.token}"
        return {"home": Path.home() / f"{name}.txt", "tmp": Path(tempfile.gettempdir()) / f"{name}.txt",
                "project": REPO / f"{name}.txt", "cache": Path.home() / ".cache" / name,
                "touched": Path(tempfile.gettempdir()) / f"{name}-touched"}

    def fill(self, program: str) -> str:
        values = {"TOKEN": self.token, "VICTIM_DIR": str(self.victim_dir), "VICTIM": str(self.victim),
                  "PID": str(self.process.pid), "PORT": str(self.server.getsockname()[1]),
                  "HPD": str(os.getpid()), **{k.upper(): str(v) for k, v in self.marks.items()}}
        for key, value in values.items():
            program = program.replace(f"<{key}>", value)
        return program

    def connected(self) -> bool:
        try:
            self.server.accept()[0].close()
            return True
        except BlockingIOError:
            return False

    def killed(self) -> bool:
        try:
            self.process.wait(timeout=0.2)
            return True
        except subprocess.TimeoutExpired:
            return False


def _named(token: str) -> list[int]:
    """Live processes whose name (comm) is `token`, as hostile programs name themselves."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                name, state = (entry / "stat").read_text().rsplit(")", 1)
                if name.split("(", 1)[1] == token and state.split()[0] not in "ZX":
                    found.append(int(entry.name))
        except (OSError, IndexError):
            pass
    return found


def _left_behind(token: str) -> bool:
    deadline = time.monotonic() + 2.0
    while _named(token):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)
    return False


_NAME = "import ctypes\nctypes.CDLL(None).prctl(15, b'<TOKEN>', 0, 0, 0)\n"  # PR_SET_NAME


@dataclass(frozen=True)
class Case:
    program: str
    harmed: Callable[[Target, CodeResult], bool]
    timeout_s: float = 3.0
    memory_mb: int = 256


CASES = {
    "write to the home folder": Case("open('<HOME>', 'w').write('x')\n", lambda t, r: t.marks["home"].exists()),
    "write to the system /tmp": Case("open('<TMP>', 'w').write('x')\n", lambda t, r: t.marks["tmp"].exists()),
    "write to the project's folder": Case("from pathlib import Path\nPath('<PROJECT>').write_text('x')\n",
                                          lambda t, r: t.marks["project"].exists()),
    "make ~/.cache/...": Case("import os\nos.makedirs('<CACHE>/sub')\n", lambda t, r: t.marks["cache"].exists()),
    "delete a file outside": Case("import os\nos.remove('<VICTIM>')\n", lambda t, r: not t.victim.exists()),
    "rmtree a folder outside": Case("import shutil\nshutil.rmtree('<VICTIM_DIR>')\n",
                                    lambda t, r: not t.victim.exists()),
    "rename a file outside": Case("import os\nos.rename('<VICTIM>', '<VICTIM>.moved')\n",
                                  lambda t, r: not t.victim.exists()),
    "chmod a file outside": Case("import os\nos.chmod('<VICTIM>', 0o777)\n",
                                 lambda t, r: t.victim.stat().st_mode & 0o777 != 0o640),
    "hard-link a file outside, write it": Case("import os\nos.link('<VICTIM>', 'here')\nopen('here', 'w').write('x')\n",
                                               lambda t, r: t.victim.read_text() != "keep"),
    "symlink a file outside, write it": Case("import os\nos.symlink('<VICTIM>', 'here')\n"
                                             "open('here', 'w').write('x')\n",
                                             lambda t, r: t.victim.read_text() != "keep"),
    "touch outside through subprocess": Case("import subprocess\nsubprocess.run(['touch', '<TOUCHED>'], check=True)\n",
                                             lambda t, r: t.marks["touched"].exists()),
    "remount / writable, then write": Case(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.mount(None, b'/', None, 32 | 4096, None):  # MS_REMOUNT | MS_BIND, without MS_RDONLY\n"
        "    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))\n"
        "open('<HOME>', 'w').write('x')\n", lambda t, r: t.marks["home"].exists()),
    "signal the parent and hpd": Case("import os, signal\nfor pid in (os.getppid(), <HPD>):\n"
                                      "    os.kill(pid, signal.SIGUSR1)\nimport time\ntime.sleep(0.2)\n",
                                      lambda t, r: bool(t.signals)),
    "kill another process": Case("import os, signal\nos.kill(<PID>, signal.SIGKILL)\n", lambda t, r: t.killed()),
    "connect with socket": Case("import socket\nsocket.create_connection(('127.0.0.1', <PORT>), timeout=2)\n",
                                lambda t, r: t.connected()),
    "connect with raw _socket": Case("import _socket\ns = _socket.socket()\ns.settimeout(2)\n"
                                     "s.connect(('127.0.0.1', <PORT>))\n", lambda t, r: t.connected()),
    "read an environment secret": Case(f"import os\nraise SystemExit(os.environ.get({SECRET!r}, 'none'))\n",
                                       lambda t, r: t.token in r.detail),
    "a child that leaves the session": Case(
        _NAME + "import os, time\nif os.fork() == 0:\n    try:\n        os.setsid()\n    finally:\n"
        "        time.sleep(30)\nraise SystemExit('left a child behind')\n",
        lambda t, r: _left_behind(t.token)),
    "fork loop": Case(_NAME + "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                      "        pass\n", lambda t, r: r.status != "timeout" or _left_behind(t.token), timeout_s=1.5),
    "count forks up to the limit": Case(
        "import os, time\nn = 0\nwhile n < <LIMIT> + 20:\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        raise SystemExit(f'fork refused after {n}')\n    if pid == 0:\n"
        "        time.sleep(30)\n        os._exit(0)\n    n += 1\n", lambda t, r: r.passed),
    "endless loop": Case("while True:\n    pass\n", lambda t, r: r.status != "timeout", timeout_s=1.0),
    "4 GiB allocation": Case("x = bytearray(4 * 1024 ** 3)\n", lambda t, r: r.status != "memory"),
}
FILES = {"write to the home folder", "write to the system /tmp", "write to the project's folder", "make ~/.cache/...",
         "delete a file outside", "rmtree a folder outside", "rename a file outside", "chmod a file outside",
         "hard-link a file outside, write it", "symlink a file outside, write it", "touch outside through subprocess"}
# the harms each layer stops on its own
CLAIMS = {
    "bwrap": FILES | {"remount / writable, then write", "signal the parent and hpd", "kill another process",
                      "connect with socket", "connect with raw _socket", "a child that leaves the session"},
    "namespaces": FILES | {"remount / writable, then write", "connect with socket", "connect with raw _socket"},
    "guard": FILES | {"signal the parent and hpd", "kill another process", "connect with socket",
                      "a child that leaves the session"},
    "cgroup": {"count forks up to the limit", "a child that leaves the session"},
}
# harms that do happen with no layer (the rest would reach the host, or loop without a limit)
CONTROL = sorted(FILES | {"signal the parent and hpd", "kill another process", "connect with socket",
                          "connect with raw _socket", "a child that leaves the session"})


@pytest.fixture
def target(monkeypatch):
    token = "hpd" + secrets.token_hex(4)
    monkeypatch.setenv(SECRET, token)
    victim_dir = Path(tempfile.mkdtemp(prefix=".hpd-victim-", dir=REPO))
    victim = victim_dir / "keep.txt"
    victim.write_text("keep")
    victim.chmod(0o640)
    process = subprocess.Popen(["sleep", "60"])
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    t = Target(token, victim_dir, victim, process, server)
    previous = signal.signal(signal.SIGUSR1, lambda *a: t.signals.append(a[0]))
    try:
        yield t
    finally:
        signal.signal(signal.SIGUSR1, previous)
        server.close()
        process.kill()
        process.wait()
        for pid in _named(token):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(victim_dir, ignore_errors=True)
        for mark in t.marks.values():
            shutil.rmtree(mark, ignore_errors=True) if mark.is_dir() else mark.unlink(missing_ok=True)


def attempt(target: Target, name: str, layers=None) -> tuple[CodeResult, bool]:
    case = CASES[name]
    program = target.fill(case.program).replace("<LIMIT>", str(sandbox.CGROUP_PROCESS_LIMIT))
    result = run_code(program, timeout_s=case.timeout_s, memory_mb=case.memory_mb, layers=layers)
    return result, case.harmed(target, result)


def need(layer: str) -> None:
    why = sandbox.layer_status()[layer]
    if why is not None:
        pytest.skip(f"the {layer} layer does not work here: {why}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_hostile_program_fails_and_leaves_no_trace(target, name):
    if name == "count forks up to the limit":
        need("cgroup")
    claimed = [layer for layer, names in CLAIMS.items() if name in names]
    if claimed and all(sandbox.layer_status()[layer] is not None for layer in claimed):
        pytest.skip(f"{name}: only {', '.join(claimed)} stop it, and none of them works here")
    result, harmed = attempt(target, name)
    assert not harmed, f"{name}: {result}"
    assert not result.passed, f"{name} passed"


@pytest.mark.parametrize("layer, name", [(layer, name) for layer, names in CLAIMS.items() for name in sorted(names)])
def test_each_layer_on_its_own_stops_its_harms(target, layer, name):
    need(layer)
    result, harmed = attempt(target, name, layers=[layer])
    assert not harmed, f"{name} under {layer} alone: {result}"


@pytest.mark.parametrize("name", CONTROL)
def test_without_layers_the_harms_are_real(target, name):
    if name == "touch outside through subprocess" and shutil.which("touch") is None:
        pytest.skip("no touch program")
    if name.startswith("hard-link") and os.stat(REPO).st_dev != os.stat(tempfile.gettempdir()).st_dev:
        pytest.skip("the project and the temporary folder are on different filesystems: no hard link between them")
    result, harmed = attempt(target, name, layers=[])
    assert harmed, f"{name} left no trace even with no layer: {result}"


def test_the_guard_names_what_it_refused(target):
    result, _ = attempt(target, "delete a file outside", layers=["guard"])
    assert result.status == "error" and MESSAGE in result.detail and str(target.victim) in result.detail
    result, _ = attempt(target, "kill another process", layers=["guard"])
    assert f"os.kill of process {target.process.pid}" in result.detail


HONEST = (
    "import os, tempfile, shutil\n"
    "assert 'HONEST' in open('solution.py').read()  # its own folder\n"
    "with tempfile.NamedTemporaryFile('w+', suffix='.txt') as f:\n"
    "    f.write('data'); f.flush(); f.seek(0); assert f.read() == 'data'\n"
    "with tempfile.TemporaryDirectory() as d:\n"
    "    os.makedirs(os.path.join(d, 'a', 'b')); open(os.path.join(d, 'a', 'b', 'c'), 'w').write('x')\n"
    "    os.chmod(os.path.join(d, 'a', 'b', 'c'), 0o600); os.rename(os.path.join(d, 'a'), os.path.join(d, 'z'))\n"
    "open(os.path.expanduser('~/notes.txt'), 'w').write('home is the run folder')\n"
    "os.remove('notes.txt')\n"
    "import json, re, collections, itertools, functools, heapq, bisect, math, decimal, fractions, datetime\n"
    "import string, typing, dataclasses, statistics, random, threading, asyncio, unittest\n"
    "from concurrent.futures import ThreadPoolExecutor\n"
    "with ThreadPoolExecutor(4) as ex:\n    assert list(ex.map(abs, [-1, -2])) == [1, 2]\n"
    "import multiprocessing\n"
    "with multiprocessing.Pool(2) as pool:\n    assert pool.map(abs, [-3, -4]) == [3, 4]\n"
    "assert asyncio.run(asyncio.sleep(0, result=5)) == 5\n"
)


@pytest.mark.parametrize("layers", [None, ["bwrap"], ["namespaces"], ["guard"], ["cgroup"]], ids=str)
def test_honest_programs_still_pass(layers):
    for layer in layers or []:
        need(layer)
    assert run_code(HONEST, timeout_s=20.0, layers=layers) == CodeResult(True, "passed", "")


@pytest.mark.parametrize("layer", ["bwrap", "namespaces"])
def test_a_virtual_environment_under_tmp_still_runs_programs(tmp_path, layer):
    """The private /tmp of a layer must not hide the interpreter: a virtual environment made
    under /tmp (a CI clone there) runs sandboxed programs through the Python behind it."""
    need(layer)
    if not str(tmp_path.resolve()).startswith("/tmp/"):
        pytest.skip("the test's folder is not under /tmp here")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    code = ("from hpd.report.scoring import run_code\n"
            f"print(run_code('print(6 * 7)', timeout_s=20, memory_mb=256, layers=[{layer!r}]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "passed=True" in out.stdout, out.stdout


def test_isolation_measures_each_layer():
    measured = {"read_only_root", "private_tmp", "network_namespace", "pid_namespace", "capabilities_dropped"}
    expected = {"bwrap": measured, "namespaces": measured - {"pid_namespace"}}
    for layer, holds in expected.items():
        if sandbox.layer_status()[layer] is None:
            report = sandbox.isolation([layer])
            assert {k for k in measured if report[k]} == holds, (layer, report)
            assert report["layers"] == [layer] and not report["guard"]
    bare = sandbox.isolation([])
    assert not any(bare[k] for k in measured - {"capabilities_dropped"} | {"guard", "mount_namespace"}), bare
    if os.geteuid() == 0:  # root keeps its capabilities, and RLIMIT_NPROC does not hold for it
        assert not bare["capabilities_dropped"] and not bare["nproc_enforced"]
    if sandbox.layer_status()["cgroup"] is None:
        report = sandbox.isolation(["cgroup"])
        assert report["nproc_enforced"] and str(sandbox.CGROUP_PROCESS_LIMIT) in report["process_limit"]


def test_the_start_line_names_the_layers_here():
    line = sandbox.describe(sandbox.isolation())
    assert line.startswith("code sandbox: ")
    for layer in sandbox.default_layers():
        assert layer in line
    for layer, why in sandbox.layer_status().items():
        if why is not None and layer not in ("bwrap", "namespaces"):
            assert why in line
    assert "no process limit" in sandbox.describe(sandbox.isolation([])) or os.geteuid() != 0


def test_unknown_and_missing_layers_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown sandbox layer 'chroot'; allowed: bwrap, namespaces"):
        run_code("pass", layers=["chroot"])
    monkeypatch.setitem(sandbox.layer_status(), "bwrap", "not installed (Debian: apt-get install bubblewrap)")
    with pytest.raises(ValueError, match="'bwrap' does not work here: not installed"):
        run_code("pass", layers=["bwrap"])
    assert "bwrap" not in sandbox.default_layers()
