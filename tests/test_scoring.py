"""Graders of eval.py on hand-written cases; generated programs run in a sandboxed child process."""

from pathlib import Path

import pytest

from minimoe.eval.sandbox import humaneval_program, mbpp_program, run_program
from minimoe.eval.scoring import (
    extract_choice,
    extract_gsm8k,
    gsm8k_correct,
    last_boxed,
    math_correct,
    normalize_math,
    pass_at_k,
)


def test_gsm8k_extraction():
    assert extract_gsm8k("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert extract_gsm8k("Total cost: $1,250.\n#### $1,250") == "1250"
    assert extract_gsm8k("so 12 - 5 = 7, then 7 * 2 = 14. The answer is 14.") == "14"
    assert extract_gsm8k("no digits here") is None
    assert extract_gsm8k("#### -3") == "-3"
    assert gsm8k_correct("... = 72\n#### 72", "Natalia sold 48/2 = 24 ...\n#### 72")
    assert gsm8k_correct("The answer is 72.0", "72") and gsm8k_correct("#### 1,000", "1000")
    assert not gsm8k_correct("#### 71", "#### 72") and not gsm8k_correct("I don't know", "#### 5")
    assert extract_gsm8k("read pages 10-20") == "20" and extract_gsm8k("x = -5 so") == "-5"  # a hyphen is no sign
    assert gsm8k_correct("#### 72\n\nQuestion: Tom has 9 ...\n#### 9", "72")  # graded on its own answer


def test_math_boxed_and_normalisation():
    assert last_boxed(r"so $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{\sqrt{x^{2}}}") == r"\sqrt{x^{2}}"
    assert last_boxed("no box") is None
    assert normalize_math(r"\dfrac{1}{2}") == r"\frac{1}{2}" == normalize_math("0.5") == normalize_math("1/2")
    assert normalize_math(r"\left( 3, 4 \right)") == "(3,4)"
    assert normalize_math(r"90^\circ") == "90" and normalize_math(r"5\%") == "5"
    assert normalize_math(r"\frac12") == r"\frac{1}{2}" and normalize_math(r"\sqrt2") == r"\sqrt{2}"
    assert normalize_math(r"x = 3") == "3" and normalize_math(r"10\text{ cm}") == "10"
    assert math_correct(r"Thus the answer is $\boxed{\dfrac{1}{2}}$", r"... $\boxed{\frac12}$")
    assert not math_correct(r"$\boxed{3}$", r"$\boxed{4}$") and not math_correct("3", "3")
    # Hendrycks' strip_string details: units after "\text{ ", signed a/b, one short "=" only, "\boxed {x}"
    assert normalize_math(r"5 \text{ cm}^2") == "5" and normalize_math(r"7\text{ and }8") == "7"
    assert normalize_math("-1/2") == normalize_math(r"\frac{-1}{2}") and normalize_math("1/x") == "1/x"
    assert normalize_math("x=1, y=2") == "x=1,y=2"
    assert last_boxed(r"\boxed {5}") == "5" and last_boxed(r"so \boxed 5$.") == "5" and last_boxed(r"\boxedx") is None


def test_multiple_choice_letter():
    assert extract_choice("The answer is (C).") == "C"
    assert extract_choice("B. because ...") == "B"
    assert extract_choice("A", letters="AB") == "A" and extract_choice("none", letters="ABCD") is None
    assert extract_choice("A good guess would be B", "ABCD") == "B"  # the article is no answer
    assert extract_choice("I think it is C", "ABCDEFGHIJ") == "C"  # nor the pronoun
    assert extract_choice("Between (B) and D, the answer is D", "ABCD") == "D"


def test_pass_at_k_known_values():
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(10, 0, 10) == 0.0 and pass_at_k(10, 8, 3) == 1.0
    assert pass_at_k(20, 5, 10) == pytest.approx(1 - 3003 / 184756)  # 1 - C(15,10)/C(20,10)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 10)


PROBLEM = {"task_id": "HumanEval/0", "entry_point": "add",
           "prompt": 'def add(a, b):\n    """Return a + b."""\n',
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


def test_humaneval_programs_are_scored_right():
    assert run_program(humaneval_program(PROBLEM, "    return a + b\n")).passed
    wrong = run_program(humaneval_program(PROBLEM, "    return a - b\n"))
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    mbpp = {"task_id": 2, "test_list": ["assert square(3) == 9"], "test_setup_code": ""}
    assert run_program(mbpp_program(mbpp, "def square(x):\n    return x * x\n")).passed
    sanitized = {"task_id": 3, "test_imports": ["import math"], "test_list": ["assert math.isclose(half(1), 0.5)"]}
    assert run_program(mbpp_program(sanitized, "def half(x):\n    return x / 2\n")).passed


@pytest.mark.slow
def test_infinite_loop_and_memory_hog_are_stopped_and_fail():
    loop = run_program(humaneval_program(PROBLEM, "    while True:\n        pass\n"), timeout=2)
    assert loop.status == "timeout" and not loop.passed
    hog = run_program(humaneval_program(PROBLEM, "    x = bytearray(4 * 1024**3)\n    return a + b\n"),
                      timeout=10, memory_mb=512)
    assert hog.status == "memory" and not hog.passed
    sleeper = run_program("import time\ntime.sleep(30)\n", timeout=1)
    assert sleeper.status == "timeout"


def test_exiting_before_the_tests_is_a_failure():
    for escape in ("import sys; sys.exit(0)", "import os; os._exit(0)"):
        result = run_program(humaneval_program(PROBLEM, f"    return 0\n{escape}\n"))
        assert result.status == "failed" and "before its tests finished" in result.detail


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie is dead, only not yet reaped


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the escaped process")
def test_children_and_escaped_grandchildren_are_killed(tmp_path):
    pids = tmp_path / "pids"
    spawn = ("import os, subprocess, sys\n"
             "a = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
             "b = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
             f"open({str(pids)!r}, 'w').write(f'{{a.pid}} {{b.pid}}')\n")
    # writable: where Landlock confines writes to the program's own directory, let it leave the pids here
    assert run_program(spawn, writable=[tmp_path]).passed  # the program itself exits 0 at once
    assert not any(_alive(int(p)) for p in pids.read_text().split())
    hang = spawn + "import time; time.sleep(60)\n"
    assert run_program(hang, timeout=1, writable=[tmp_path]).status == "timeout"
    assert not any(_alive(int(p)) for p in pids.read_text().split())


@pytest.mark.slow
def test_output_floods_stay_out_of_the_evaluator():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flood = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 2**20)\n", timeout=2)
    assert flood.status == "timeout"
    err = run_program("import sys\nwhile True:\n    sys.stderr.write('y' * 2**20)\n", timeout=5, max_file_mb=4)
    assert err.status == "failed" and len(err.detail) <= 500  # the file-size limit stops it
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: nothing buffered here
