r"""Scores for a student's generations, as the HPD paper's settings report them.

Math: exact match of the final answer (the last ``\boxed{...}``, else the last number),
compared after normalisation, so ``\dfrac{1}{2}``, ``1/2`` and ``0.5`` agree; pass@1 and the
unbiased pass@k estimator of Chen et al. (2021).

Dialogue: ROUGE-L F-measure x100, as DistiLLM and MiniLLM report it on Dolly: the
``rouge-score`` package's ``RougeScorer(["rougeL"], use_stemmer=True)``, averaged over prompts
(the best reference where a prompt has several). ``rouge-score`` is the ``eval`` extra.

Code: pass@1 of generated Python run against its tests, each program in the sandbox of
`hpd.report.sandbox` (what it guards against, and what it does not, is written there and in
docs/code-sandbox.md).
"""

from __future__ import annotations

import math
import re
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from hpd.report.guard import NETWORK_MESSAGE
from hpd.report.sandbox import OUTPUT_LIMIT, isolation, run

__all__ = [
    "boxed_answer", "extract_answer", "reference_answer", "normalize_answer", "answers_match", "math_exact_match",
    "pass_at_1", "pass_at_k", "rouge_l",
    "CodeResult", "extract_code", "run_code", "code_pass_at_1", "isolation", "NETWORK_MESSAGE", "OUTPUT_LIMIT",
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


def run_code(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
             layers: Iterable[str] | None = None) -> CodeResult:
    """Run a Python program in the sandbox (`hpd.report.sandbox`), with `layers` (default: every
    layer that works on this machine; tests name one to prove it on its own).

    'passed' when it exits 0; 'failed' when an assertion fails; 'timeout' past timeout_s of
    wall clock (or the CPU limit); 'memory' on a MemoryError; 'error' for anything else."""
    outcome = run(program, timeout_s=timeout_s, memory_mb=memory_mb, layers=layers)
    return _verdict(outcome.returncode, outcome.timed_out, outcome.stderr, timeout_s)


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
