r"""Scores for a student's generations, as the HPD paper's settings report them.

Math: exact match of the final answer (the last ``\boxed{...}``, else the last number),
compared after normalisation, so ``\dfrac{1}{2}``, ``1/2`` and ``0.5`` agree; pass@1 and the
unbiased pass@k estimator of Chen et al. (2021).

Dialogue: ROUGE-L F-measure x100, as DistiLLM and MiniLLM report it on Dolly: the
``rouge-score`` package's ``RougeScorer(["rougeL"], use_stemmer=True)``, averaged over prompts
(the best reference where a prompt has several). ``rouge-score`` is the ``eval`` extra.

Code: pass@1 of generated Python run against its tests. Each program runs

- in a fresh ``sys.executable -I -S`` (isolated mode: no PYTHON* variables, no user site,
  no site-packages, the script's folder not on sys.path), stdin from /dev/null;
- in a fresh temporary directory, its working directory, HOME and TMPDIR, removed
  afterwards; the environment holds only PATH, HOME, TMPDIR and LANG;
- under limits set in the child before exec (``preexec_fn``): RLIMIT_AS ``memory_mb``,
  RLIMIT_CPU about the timeout, RLIMIT_FSIZE 16 MiB (stdout and stderr go to files in the
  folder, so these bound the output too), RLIMIT_NPROC 256 where the kernel permits (root
  is exempt from it), RLIMIT_CORE 0;
- in a new session whose whole process group is killed with SIGKILL at the wall-clock
  timeout, and after the program ends (so no background child outlives it);
- in a new network namespace where the kernel allows one (``unshare(CLONE_NEWNET)``, with
  CLONE_NEWUSER when not root): its only interface is a loopback that is down;
- after a prelude that replaces ``socket.socket``, ``socket.create_connection`` and
  ``socket.getaddrinfo`` with ones raising OSError (a socket wrapping a descriptor it was
  given, as ``socketpair`` makes, still works), on every platform.

:func:`isolation` reports which of these hold on this machine. This guards against
accidents (a loop that never ends, a runaway allocation, a stray download, files written
about the place), not against hostile code: the child runs as the same user, sees the same
files, and can undo the socket guard through ``_socket``. ``preexec_fn`` is not safe in a
process with other threads, so run the programs from one thread.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "boxed_answer", "extract_answer", "reference_answer", "normalize_answer", "answers_match", "math_exact_match",
    "pass_at_1", "pass_at_k", "rouge_l",
    "CodeResult", "extract_code", "run_code", "code_pass_at_1", "isolation",
]

# ---------------------------------------------------------------- math answers

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])(\s*)")
# a number: 1,234.5 (thousands kept whole), 12, -3.5, 3/4, .5; a minus only where it cannot be
# a subtraction ("5-3" ends in 3)
_NUMBER = re.compile(r"(?<![\w.)])-?(?:\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_TRAILING_UNIT = re.compile(r"^(.*?)\s*\\(?:text|textrm|mathrm|mbox)\{[^{}]*\}$")
_FRAC = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_ATOM = re.compile(r"-?[0-9A-Za-z.]+")


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group opening at text[start]; None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def boxed_answer(text: str) -> str | None:
    r"""The content of the last closed ``\boxed{...}`` / ``\fbox{...}`` (or ``\boxed 5``)."""
    found = None
    for m in _BOX.finditer(text):
        i = m.end()
        if text[i:i + 1] == "{":
            content = _braced(text, i)
        elif m.group(1):  # "\boxed 5": up to the next space or dollar
            bare = re.match(r"[^\s$]+", text[i:])
            content = bare.group(0) if bare else None
        else:
            content = None
        if content is not None:
            found = content
    return found


def extract_answer(text: str) -> str | None:
    """A generation's final answer: the last box, else the last number, as written; None if neither."""
    boxed = boxed_answer(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def reference_answer(reference: str) -> str:
    """The answer in a reference: its last box (MATH), what follows '####' (GSM8K), else all of it."""
    boxed = boxed_answer(reference)
    if boxed is not None:
        return boxed
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    return reference.strip()


def _as_number(text: str) -> Fraction | None:
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    num, slash, den = text.partition("/")
    if not _PLAIN_NUMBER.fullmatch(num) or (slash and not _PLAIN_NUMBER.fullmatch(den)):
        return None
    value = Fraction(num)
    if slash:
        if Fraction(den) == 0:
            return None
        value /= Fraction(den)
    return value


def normalize_answer(answer: str) -> str:
    r"""The answer as compared: no dollars, spacing commands, \left/\right, \text wrappers,
    degrees or percent signs; ``\dfrac{a}{b}`` as ``a/b``; a number's trailing unit dropped."""
    s = answer.strip().replace("\u2212", "-").replace("{,}", ",")
    s = re.sub(r"\\[!,;: ]", "", s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = s.replace("$", "")
    for degree in ("^{\\circ}", "^\\circ", "\\circ", "\\%", "%"):
        s = s.replace(degree, "")
    unit = _TRAILING_UNIT.match(s.strip())
    if unit and _as_number(unit.group(1).replace(" ", "")) is not None:
        s = unit.group(1)  # "5\text{ cm}" is 5
    while _TEXT_WRAP.search(s):
        s = _TEXT_WRAP.sub(r"\1", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", "", s)

    def frac(m: re.Match) -> str:
        a, b = (p if _ATOM.fullmatch(p) else f"({p})" for p in m.groups())
        return f"{a}/{b}"

    s = _FRAC.sub(frac, s)
    s = s.rstrip(".")
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and re.fullmatch(r"[A-Za-z]\w?", lhs):
        s = rhs  # "x=5" is 5
    return s


def answers_match(prediction: str, reference: str) -> bool:
    """Equal after normalisation, or equal as numbers (2.0 and 2, 1,000 and 1000, 1/2 and 0.5)."""
    a, b = normalize_answer(prediction), normalize_answer(reference)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and x == y


def canonical_answer(answer: str) -> str:
    """One string per class of `answers_match`: a number as its exact fraction (2.0, 2 and 4/2
    all read 2), anything else normalised. Lets answers be compared with ==."""
    s = normalize_answer(answer)
    value = _as_number(s)
    return s if value is None else str(value)


def math_exact_match(prediction: str, reference: str) -> bool:
    """Whether a generation's final answer matches the reference's (see `reference_answer`)."""
    answer = extract_answer(prediction)
    return answer is not None and answers_match(answer, reference_answer(reference))


def pass_at_1(samples_correct: Sequence[Sequence[bool]]) -> float:
    """The mean over prompts of the share of each prompt's samples that are correct (0..1)."""
    if not samples_correct or any(len(row) == 0 for row in samples_correct):
        raise ValueError("pass@1 needs at least one prompt and one sample per prompt")
    return sum(sum(map(bool, row)) / len(row) for row in samples_correct) / len(samples_correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate 1 - C(n-c, k) / C(n, k) that one of k samples out of n, c of them
    correct, passes (Chen et al. 2021), as a product so large n stays exact enough."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


# ---------------------------------------------------------------- dialogue


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure x100 (0..100); a prompt with several references scores its best."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ImportError("ROUGE-L needs the rouge-score package: pip install 'hpd-distill[eval]'") from err
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("ROUGE-L needs at least one prediction")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = 0.0
    for prediction, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        total += max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in refs)
    return 100.0 * total / len(predictions)


# ---------------------------------------------------------------- code

CODE_STATUSES = ("passed", "failed", "timeout", "memory", "error")
OUTPUT_LIMIT = 16 * 2**20  # RLIMIT_FSIZE: any one file the program writes, its output included
PROCESS_LIMIT = 256  # RLIMIT_NPROC (counted per user, so not lower)
NETWORK_MESSAGE = "network access is disabled in the hpd code sandbox"
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000

# runs before the program, in the child; the program then runs as __main__ from its file
_PRELUDE = f"""
def _guard_network():
    import socket

    def refuse(*args, **kwargs):
        raise OSError({NETWORK_MESSAGE!r})

    class GuardedSocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:
                refuse()
            super().__init__(family, type, proto, fileno)

    socket.socket = GuardedSocket
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

_guard_network()
import runpy, sys
runpy.run_path(sys.argv[1], run_name="__main__")
"""

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)(?:```|\Z)", re.S | re.I)


@dataclass(frozen=True)
class CodeResult:
    passed: bool
    status: str  # one of CODE_STATUSES
    detail: str = ""  # the exception's last line, or what stopped the program


def extract_code(completion: str) -> str:
    """The first ```python (or ```py) fenced block, unclosed at the end included; else the whole text."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


@functools.cache
def _unshare():
    """libc's unshare, looked up in the parent so the forked child does as little as it can."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):
        return None


def _child_setup(timeout_s: float, memory_mb: int):
    import resource

    unshare = _unshare()
    cpu = math.ceil(timeout_s) + 1
    limits = [("RLIMIT_AS", memory_mb * 2**20, memory_mb * 2**20), ("RLIMIT_CPU", cpu, cpu + 1),
              ("RLIMIT_FSIZE", OUTPUT_LIMIT, OUTPUT_LIMIT), ("RLIMIT_NPROC", PROCESS_LIMIT, PROCESS_LIMIT),
              ("RLIMIT_CORE", 0, 0)]
    limits = [(getattr(resource, name), soft, hard) for name, soft, hard in limits if hasattr(resource, name)]

    def setup():  # in the child, between fork and exec
        if unshare is not None and unshare(_CLONE_NEWNET) != 0:
            unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        for which, soft, hard in limits:
            try:
                _, old_hard = resource.getrlimit(which)
                if old_hard != resource.RLIM_INFINITY:
                    soft, hard = min(soft, old_hard), min(hard, old_hard)
                resource.setrlimit(which, (soft, hard))
            except (ValueError, OSError):
                pass

    return setup


def _spawn(args: list[str], folder: str, timeout_s: float, memory_mb: int, out, err):
    env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}
    return subprocess.Popen([sys.executable, "-I", "-S", *args], cwd=folder, env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                            start_new_session=True, preexec_fn=_child_setup(timeout_s, memory_mb))


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


def _verdict(returncode: int, timed_out: bool, stderr: str, timeout_s: float) -> CodeResult:
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if timed_out:
        return CodeResult(False, "timeout", f"still running after {timeout_s:g} s")
    if returncode == 0:
        return CodeResult(True, "passed", "")
    if hasattr(signal, "SIGXCPU") and returncode == -signal.SIGXCPU:
        return CodeResult(False, "timeout", "CPU time limit")
    if last.startswith("MemoryError") or "Cannot allocate memory" in stderr[-2000:]:
        return CodeResult(False, "memory", last or "out of memory")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return CodeResult(False, "error", f"killed by {name}")
    if last.startswith("AssertionError"):
        return CodeResult(False, "failed", last)
    return CodeResult(False, "error", last or f"exit status {returncode}")


def run_code(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> CodeResult:
    """Run a Python program in the sandbox the module docstring describes.

    'passed' when it exits 0; 'failed' when an assertion fails; 'timeout' past timeout_s of
    wall clock (or the CPU limit); 'memory' on a MemoryError; 'error' for anything else."""
    folder = tempfile.mkdtemp(prefix="hpd-code-")
    try:
        path = os.path.join(folder, "solution.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        err_path = os.path.join(folder, ".stderr")
        with open(os.path.join(folder, ".stdout"), "wb") as out, open(err_path, "wb") as err:
            proc = _spawn(["-c", _PRELUDE, path], folder, timeout_s, memory_mb, out, err)
            timed_out = _wait_then_kill_group(proc, timeout_s)
        with open(err_path, "rb") as f:
            f.seek(max(0, os.path.getsize(err_path) - 8192))
            stderr = f.read().decode("utf-8", "replace")
        return _verdict(proc.returncode, timed_out, stderr, timeout_s)
    finally:
        _remove(folder)


def code_pass_at_1(completions: Sequence[str | Sequence[str]], tests: Sequence[str], *,
                   timeout_s: float = 5.0, memory_mb: int = 512) -> float:
    """pass@1 (0..1) of completions, one or several per problem, each problem's tests appended
    to the code extracted from each completion (HumanEval's ``check(...)`` call included)."""
    if len(completions) != len(tests):
        raise ValueError(f"{len(completions)} completions but {len(tests)} tests")
    table = []
    for samples, test in zip(completions, tests):
        samples = [samples] if isinstance(samples, str) else list(samples)
        table.append([run_code(f"{extract_code(s)}\n\n{test}\n", timeout_s=timeout_s,
                               memory_mb=memory_mb).passed for s in samples])
    return pass_at_1(table)


_PROBE = """
import json, os, resource
def ns(kind):
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return None
names = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE")
limits = {n: resource.getrlimit(getattr(resource, n))[0] for n in names if hasattr(resource, n)}
print(json.dumps({"net": ns("net"), "user": ns("user"), "limits": limits}))
"""


@functools.cache
def isolation() -> dict:
    """Which of the sandbox's measures hold here, read from a child started as `run_code` starts one
    with its default limits."""
    import resource

    def ns(kind):
        try:
            return os.readlink(f"/proc/self/ns/{kind}")
        except OSError:
            return None

    folder = tempfile.mkdtemp(prefix="hpd-code-")
    try:
        out_path = os.path.join(folder, ".stdout")
        with open(out_path, "wb") as out:
            proc = _spawn(["-c", _PROBE], folder, 5.0, 512, out, subprocess.DEVNULL)
            _wait_then_kill_group(proc, 30.0)
        with open(out_path, encoding="utf-8") as f:
            child = json.loads(f.read() or "{}")
    finally:
        _remove(folder)
    limits = {name: (None if value == resource.RLIM_INFINITY else value)
              for name, value in child.get("limits", {}).items()}
    return {
        "interpreter": f"{sys.executable} -I -S",
        "temporary_directory": True,
        "environment": ["HOME", "LANG", "PATH", "TMPDIR"],
        "rlimits": limits,
        "nproc_enforced": "RLIMIT_NPROC" in limits and os.geteuid() != 0,
        "process_group_kill": True,
        "network_namespace": child.get("net") is not None and child.get("net") != ns("net"),
        "user_namespace": child.get("user") is not None and child.get("user") != ns("user"),
        "socket_guard": True,
    }
