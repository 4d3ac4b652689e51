"""Answer extraction and metrics of the papers' benchmarks (deterministic graders, no LLM judge).

* A solution's final answer is marked by ``\\boxed{...}`` (MATH's convention), ``#### X`` (GSM8K's) or
  ``The answer is: X`` (MetaMathQA's last line, which a model fine-tuned on it writes). The first ``####`` or
  "The answer is:" ends the solution at the end of its line (a model that goes on to invent the next
  problem is graded on its own answer) and gives the answer (MetaMathQA writes ``$\\boxed{5}$`` and then
  "The answer is: 5"), or a box after it on its line does ("The answer is: $\\boxed{5}$"); a solution
  without such a line is answered by its last box.
* GSM8K: the first number of the marked answer (``\\boxed``, ``####``, "The answer is:"), else the last
  number in the text; compared numerically.
* MATH: the marked answer (``\\boxed``/``\\fbox`` or "The answer is:"), equal to the reference's when
  Hendrycks et al.'s ``strip_string`` normalisations agree or, where Hugging Face's ``math-verify`` is
  installed (``pip install 'minimoe[math]'``), when it finds the two equivalent (``\\sqrt{12}`` = ``2\\sqrt{3}``,
  ``0.25`` = ``\\frac14``). Which of the two graded is reported (:func:`math_grader`).
* Multiple choice: "answer is X" / "(X)" / a leading "X." first, then the first standalone option letter
  that is not the word "A" or "I".
* pass@k: the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``.
"""

from __future__ import annotations

import re
import threading

import numpy as np

_NUMBER = re.compile(r"(?:(?<![\w.])-)?[\d,]*\.?\d+")  # "10-20" is 10 and 20, not 10 and -20

# The markers of a final answer. "####" counts only before a number: "#### Step 1" is a Markdown heading.
BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
HASHES = re.compile(r"####(?=[ \t]*\$?-?[\d.])")
ANSWER_IS = re.compile(r"the answer is:", re.I)
GSM8K_MARKERS = (BOXED, HASHES, ANSWER_IS)
MATH_MARKERS = (BOXED, ANSWER_IS)  # "####" is GSM8K's; MetaMathQA's MATH answers end "The answer is:"
_ENDS_SOLUTION = (HASHES, ANSWER_IS)  # a solution's last line; a box may sit anywhere in it

HENDRYCKS = "hendrycks-normalisation"  # summary.json's "grader" of MATH without math-verify
_NO_MATH_VERIFY = ("the math-verify grader needs the math-verify package: pip install 'minimoe[math]' "
                   "(or pip install math-verify)")


def _to_number(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def _boxed_at(text: str, idx: int) -> str | None:
    """Content of the ``\\boxed{...}`` / ``\\fbox{...}`` at ``idx`` (balanced braces), or of ``\\boxed x``."""
    rest = text[idx:]
    name = "\\boxed" if rest.startswith("\\boxed") else "\\fbox"
    after = rest[len(name):]
    if not after.lstrip(" ").startswith("{"):  # "\boxed 5"; "\boxedx" is not a box
        if not after.startswith(" "):
            return None
        return after.strip().split("$")[0].strip() or None
    start = len(name) + after.index("{")
    depth = 0
    for i, ch in enumerate(rest[start:], start):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return rest[start + 1:i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or ``\\boxed x``."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    return _boxed_at(text, idx) if idx >= 0 else None


def _line_value(text: str) -> str | None:
    """What follows a ``####`` / "The answer is:" on its line, without ``$...$`` around it or a final full stop."""
    value = text.split("\n", 1)[0].strip().rstrip(".").strip()
    if len(value) > 1 and value[0] == value[-1] == "$":
        value = value.strip("$").strip().rstrip(".").strip()
    return value or None


def final_answer(text: str, markers=MATH_MARKERS) -> str | None:
    """The marked final answer of a solution (see the module's docstring), or None when it has none.

    The solution ends with the line of its first ``####`` / "The answer is:" (of ``markers``): what follows
    is a model going on past its answer. That marker's value is the answer, unless a box follows it on its
    line ("The answer is: $\\boxed{5}$"); without such a line (or with nothing after it), the last box.

    Args:
        text: a completion or a reference solution.
        markers: the patterns that mark an answer (:data:`GSM8K_MARKERS` or :data:`MATH_MARKERS`).
    """
    found = []  # (start, end, is a box) of the candidates
    ends = [m for pattern in markers if pattern in _ENDS_SOLUTION for m in [pattern.search(text)] if m]
    if ends:
        first = min(ends, key=lambda m: m.start())
        cut = text.find("\n", first.end())
        text = text if cut < 0 else text[:cut]
        found.append((first.start(), first.end(), False))
    if BOXED in markers:
        found += [(m.start(), m.end(), True) for m in BOXED.finditer(text)]
    for start, end, boxed in sorted(found, reverse=True):
        value = _boxed_at(text, start) if boxed else _line_value(text[end:])
        if value:
            return value
    return None


def extract_gsm8k(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: the first number of its marked answer (:func:`final_answer`
    with ``\\boxed{}``, ``####``, "The answer is:"), else the last number in the text."""
    marked = final_answer(text, GSM8K_MARKERS)
    if marked is not None:
        m = _NUMBER.search(marked.replace("$", ""))
        return m.group(0).replace(",", "") if m else marked
    numbers = _NUMBER.findall(text.replace("$", ""))
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def gsm8k_correct(completion: str, reference: str) -> bool:
    """Numeric equality of the extracted answers (``reference`` may be a full solution or a number)."""
    got, want = extract_gsm8k(completion), extract_gsm8k(reference)
    if got is None or want is None:
        return False
    a, b = _to_number(got), _to_number(want)
    return a is not None and b is not None and abs(a - b) < 1e-6 * max(1.0, abs(b))


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        out += f"{{{a}}}" + (f"{{{b}}}" + rest if b != "{" else "{" + rest)
    return out


def _fix_slash(s: str) -> str:
    if s.count("/") != 1:
        return s
    a, b = s.split("/")
    try:
        if s != f"{int(a)}/{int(b)}":
            return s
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}"


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalize_math(s: str) -> str:
    """Hendrycks et al.'s ``strip_string`` (MATH): units, spacing, frac/sqrt forms, 0.5 → \\frac{1}{2}."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    if "\\text{ " in s:  # Hendrycks' _remove_right_units: everything from "\text{ " on is units
        s = s.split("\\text{ ")[0]
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s.strip()) if re.search(r"\d", s) else s
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:  # "x=3" -> "3" (a short left side only)
        s = s.split("=")[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_slash(s)


def math_verify_version() -> str | None:
    """The installed ``math-verify``'s version (e.g. ``"0.9.0"``), or None when it cannot be imported."""
    try:
        import math_verify  # the optional extra minimoe[math]
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("math-verify")
    except PackageNotFoundError:  # importable without being an installed distribution (a source tree)
        return getattr(math_verify, "__version__", "unknown")


def math_grader(use_math_verify: bool | None = None) -> str:
    """The MATH grader as ``summary.json`` reports it: ``"math-verify 0.9.0"`` or :data:`HENDRYCKS`.

    Args:
        use_math_verify: True: math-verify (an error naming the extra where it is not installed); False: the
            normalisation alone; None: math-verify where it is installed.
    """
    v = math_verify_version() if use_math_verify is not False else None
    if use_math_verify and v is None:
        raise ValueError(_NO_MATH_VERIFY)
    return f"math-verify {v}" if v else HENDRYCKS


def _math_verify_equal(got: str, want: str, use_math_verify: bool | None) -> bool:
    """math-verify's verdict on two extracted answers, each parsed as one LaTeX expression (``$...$``); False
    where it is not installed (an error if ``use_math_verify`` asks for it) or not wanted."""
    if use_math_verify is False:
        return False
    try:
        from math_verify import parse, verify
    except ImportError:
        if use_math_verify:
            raise ValueError(_NO_MATH_VERIFY) from None
        return False
    # its time limits use SIGALRM, which only the main thread may set; elsewhere it runs without one
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${want}$", parsing_timeout=limit)
    pred = parse(f"${got}$", parsing_timeout=limit)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=limit))


def math_equal(got: str, want: str, use_math_verify: bool | None = None) -> bool:
    """Whether two MATH answers are equal: their Hendrycks normalisations are, or math-verify says so.

    Args:
        got: the completion's answer.
        want: the reference answer.
        use_math_verify: as :func:`math_grader` (normalised equality alone decides without math-verify).
    """
    if normalize_math(got) == normalize_math(want):
        return True
    return _math_verify_equal(got, want, use_math_verify)


def math_correct(completion: str, reference: str, use_math_verify: bool | None = None) -> bool:
    """Whether the completion's marked answer (:func:`final_answer`: the last ``\\boxed{}`` or "The answer is:")
    equals the reference's.

    Args:
        completion: the generated solution.
        reference: the row's answer, or a solution whose answer is marked the same way.
        use_math_verify: as :func:`math_grader`.
    """
    got = final_answer(completion, MATH_MARKERS)
    want = final_answer(reference, MATH_MARKERS) or reference.strip()
    return got is not None and math_equal(got, want, use_math_verify)


def extract_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The chosen option letter: "answer is (B)" / "answer: B", then "(B)", then a leading "B" / "B." /
    "B)", then the first standalone letter that is not the article "A" or pronoun "I" before a word."""
    text = text.strip()
    for pattern in (rf"answer(?: is|:)?\s*\(?([{letters}])\b", rf"\(([{letters}])\)", rf"^([{letters}])(?:[.):]|$)"):
        m = re.search(pattern, text, re.I if pattern.startswith("answer") else 0)
        if m and m.group(1) in letters:
            return m.group(1)
    for m in re.finditer(rf"\b([{letters}])\b", text):
        if m.group(1) in "AI" and re.match(r"\s+[a-z]", text[m.end():]):
            continue  # "A good guess", "I think"
        return m.group(1)
    return None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
