r"""The eval metrics: math answers, pass@k, ROUGE-L and sandboxed code, on hand-made cases."""

import os
import sys
import time

import pytest

from hpd.report import scoring
from hpd.report.scoring import (
    answers_match, code_pass_at_1, extract_answer, extract_code, isolation, math_exact_match,
    normalize_answer, pass_at_1, pass_at_k, reference_answer, rouge_l, run_code,
)

# ---------------------------------------------------------------- math answers


def test_boxed_takes_the_last_box_with_its_nested_braces():
    text = r"First \boxed{1}, then \boxed{\frac{x^{2}}{\{y\}}} is the answer."
    assert extract_answer(text) == r"\frac{x^{2}}{\{y\}}"
    assert extract_answer(r"so \boxed {42}.") == "42"
    assert extract_answer(r"\fbox{7} and 8") == "7"
    assert extract_answer(r"$\boxed 5$") == "5"
    # a box cut off by the token limit is no box: the last number stands in
    assert extract_answer(r"\boxed{12} then \boxed{3") == "12"
    assert extract_answer(r"answer \boxed{3") == "3"


def test_last_number_fallback():
    assert extract_answer("She has 3 apples, then 17.") == "17"
    assert extract_answer("It costs $1,234.50 in all") == "1,234.50"
    assert extract_answer("The result is -3.") == "-3"
    assert extract_answer("between 5-10") == "10"  # a dash between numbers is no minus sign
    assert extract_answer("3/4 of the cake") == "3/4"
    assert extract_answer("about .5 of it") == ".5"
    assert extract_answer("1,2345") == "2345"  # not a thousands separator
    assert extract_answer("no digits here") is None


def test_reference_answer_reads_math_gsm8k_and_bare_references():
    assert reference_answer(r"So it is $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert reference_answer("3 + 4 = 7\n#### 7") == "7"
    assert reference_answer(r" \frac{3}{4} ") == r"\frac{3}{4}"


@pytest.mark.parametrize("a, b", [
    ("2.0", "2"), ("1,000", "1000"), ("1{,}000", "1000"), (r"1\!000", "1000"),
    (r"\frac{1}{2}", r"\dfrac{1}{2}"), (r"\tfrac12", "1/2"), ("1/2", "0.5"), (r"\frac{1}{2}", ".5"),
    ("$5$.", "5"), (r"\left( 1, 2 \right)", "(1,2)"), (r"\text{(A)}", "(A)"), (r"\textbf{yes}", "yes"),
    (r"5\text{ cm}", "5"), (r"90^\circ", "90"), (r"50\%", "50"), ("x = 5", "5"), ("\u22124", "-4"),
    (r"\sqrt2", r"\sqrt{2}"), (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt{3}}{2}"),
])
def test_normalised_answers_that_agree(a, b):
    assert answers_match(a, b) and answers_match(b, a)


@pytest.mark.parametrize("a, b", [
    ("2", "3"), ("1/3", "0.3333"), ("(1,2)", "(2,1)"), ("12", "1,2"), (r"\frac{x+1}{2}", "x+1/2"),
    ("1/0", "0"), ("-2", "2"), (r"\text{(A)}", "(B)"),
])
def test_normalised_answers_that_differ(a, b):
    assert not answers_match(a, b)


def test_normalize_answer_spells_fractions_and_strips_decoration():
    assert normalize_answer(r"$\dfrac{3}{4}$.") == "3/4"
    assert normalize_answer(r"\frac{x+1}{2}") == "(x+1)/2"
    assert normalize_answer(r"\left[ 0, \infty \right)") == r"[0,\infty)"


def test_math_exact_match_extracts_both_sides():
    assert math_exact_match(r"... so the answer is $\boxed{\dfrac{1}{2}}$.", r"Thus \boxed{\frac12}.")
    assert math_exact_match("18 - 6 = 12 apples, so 12.", "18 - 6 = 12\n#### 12")
    assert math_exact_match("The total is 1,000 dollars", "1000")
    assert not math_exact_match("The total is 1,001 dollars", "1000")
    assert not math_exact_match("I cannot tell.", "4")


# ---------------------------------------------------------------- pass@k


def test_pass_at_1_is_the_mean_share_per_prompt():
    # (1/2 + 3/4 + 0) / 3
    assert pass_at_1([[True, False], [True, True, True, False], [False]]) == pytest.approx(5 / 12)
    assert pass_at_1([[True]]) == 1.0
    with pytest.raises(ValueError):
        pass_at_1([[True], []])


def test_pass_at_k_against_binomials():
    # 1 - C(n-c, k) / C(n, k), by hand
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2)=3, C(5,2)=10
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert pass_at_k(4, 0, 3) == 0.0
    assert pass_at_k(3, 2, 2) == 1.0  # fewer wrong samples than k: one of any k passes
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_against_the_lcs_by_hand():
    pytest.importorskip("rouge_score")
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l(["alpha beta"], ["gamma delta"]) == 0.0
    # LCS "the cat sat" = 3 tokens: P = 3/3, R = 3/5, F = 2PR / (P + R) = 0.75
    assert rouge_l(["the cat sat"], ["the big cat sat down"]) == pytest.approx(75.0)
    # LCS "the cat on mat" = 4 of 6 either way: F = 2/3
    assert rouge_l(["the cat sat on the mat"], ["the cat was on a mat"]) == pytest.approx(200 / 3)
    # the mean over prompts, lower case and punctuation dropped, Porter stems ("cats" -> "cat")
    assert rouge_l(["The Cat!", "x"], ["the cat", "y"]) == pytest.approx(50.0)
    assert rouge_l(["cats running"], ["cat run"]) == pytest.approx(100.0)
    # several references: the best one
    assert rouge_l(["the cat sat"], [["dogs bark", "the big cat sat down"]]) == pytest.approx(75.0)


def test_rouge_l_names_the_extra_when_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(ImportError, match=r"pip install 'hpd-distill\[eval\]'"):
        rouge_l(["a"], ["a"])


# ---------------------------------------------------------------- code


def test_passing_and_failing_programs():
    assert run_code("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n") == \
        scoring.CodeResult(True, "passed", "")
    failed = run_code("assert 1 + 1 == 3, 'arithmetic'\n")
    assert (failed.passed, failed.status, failed.detail) == (False, "failed", "AssertionError: arithmetic")
    broken = run_code("def f(:\n")
    assert (broken.status, broken.detail.split(":")[0]) == ("error", "SyntaxError")
    assert run_code("raise SystemExit(3)").detail == "exit status 3"


def test_an_endless_loop_times_out_within_the_limit():
    start = time.monotonic()
    result = run_code("while True:\n    pass\n", timeout_s=1.0)
    assert (result.passed, result.status) == (False, "timeout")
    assert time.monotonic() - start < 3.0


def test_a_big_allocation_hits_the_memory_limit():
    result = run_code("x = bytearray(2 * 1024 ** 3)\n", memory_mb=256)
    assert (result.passed, result.status, result.detail) == (False, "memory", "MemoryError")
    assert run_code("x = bytearray(16 * 1024 ** 2)\n", memory_mb=256).passed


@pytest.mark.parametrize("program", [
    "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\n",
    "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9/', timeout=1)\n",
])
def test_the_socket_guard_refuses_connections(program):
    result = run_code(program)
    assert (result.passed, result.status) == (False, "error")
    assert scoring.NETWORK_MESSAGE in result.detail


def test_the_socket_guard_holds_without_a_namespace():
    result = run_code("import socket\nsocket.getaddrinfo('localhost', 80)\n", layers=["guard"])
    assert result.status == "error" and scoring.NETWORK_MESSAGE in result.detail
    # socketpair wraps descriptors it already has, so it (and asyncio) keeps working
    program = "import socket\na, b = socket.socketpair()\na.send(b'x')\nassert b.recv(1) == b'x'\n"
    assert run_code(program, layers=["guard"]).passed


def test_a_fresh_folder_and_environment_removed_afterwards():
    program = ("import os, sys\nopen('scratch', 'w').write('x')\n"
               "raise SystemExit(os.getcwd() + '|' + ','.join(sorted(os.environ)) + '|'"
               " + str(sys.flags.isolated) + str(sys.flags.no_site) + str(sys.flags.dont_write_bytecode))\n")
    folder, env, flags = run_code(program).detail.split("|")
    assert folder != os.getcwd() and os.path.basename(folder).startswith("hpd-code-")
    assert not os.path.exists(folder)
    assert env.split(",") == ["HOME", "LANG", "PATH", "PWD", "TMPDIR"]
    assert flags == "111"


def test_background_children_do_not_outlive_the_program(tmp_path):
    """The process-group kill, which holds with no layer at all (test_sandbox.py covers a child
    that leaves the group)."""
    pid_file = tmp_path / "pid"
    program = (f"import os, time\npid = os.fork()\nif pid == 0:\n    time.sleep(60)\n"
               f"else:\n    open({str(pid_file)!r}, 'w').write(str(pid))\n")
    assert run_code(program, layers=[]).passed
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the forked child {pid} is still running")


def test_isolation_reports_the_limits_the_child_sees():
    report = isolation()
    assert report["interpreter"].endswith(" -I -S -B") and report["socket_guard"]
    limits = report["rlimits"]
    assert limits["RLIMIT_AS"] == 512 * 2**20
    assert limits["RLIMIT_CORE"] == 0
    assert limits["RLIMIT_FSIZE"] == scoring.OUTPUT_LIMIT
    assert limits["RLIMIT_CPU"] == 6  # the 5 s default, rounded up, plus one


def test_code_is_taken_from_the_first_python_fence():
    text = "Here it is:\n```python\ndef f():\n    return 1\n```\nand also\n```python\nf = None\n```\n"
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("```py\nx = 2\n") == "x = 2\n"  # cut off before the closing fence
    assert extract_code("```bash\nls\n```\nx = 1") == "```bash\nls\n```\nx = 1"
    assert extract_code("def g():\n    return 2") == "def g():\n    return 2"


def test_code_pass_at_1_runs_each_sample_against_its_tests():
    good = "Sure.\n```python\ndef inc(x):\n    return x + 1\n```\nThis adds one."
    bad = "```python\ndef inc(x):\n    return x\n```"
    tests = ["assert inc(1) == 2\nassert inc(-1) == 0", "assert double(4) == 8"]
    double = "def double(x):\n    return 2 * x"
    assert code_pass_at_1([[good, bad], double], tests) == pytest.approx((1 / 2 + 1) / 2)
    assert code_pass_at_1([[bad], "def double(x): return x"], tests) == 0.0
