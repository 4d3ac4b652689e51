"""Answer extraction and metrics of the papers' benchmarks (deterministic graders, no LLM judge).

* GSM8K: the number after the first ``####`` (a model that goes on to invent the next problem is graded
  on its own answer), else the last number in the text; compared numerically.
* MATH: the last ``\\boxed{...}`` (or ``\\fbox``), normalised as in Hendrycks et al.'s ``strip_string``.
* Multiple choice: "answer is X" / "(X)" / a leading "X." first, then the first standalone option letter
  that is not the word "A" or "I".
* pass@k: the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``.
"""

from __future__ import annotations

import re

import numpy as np

_NUMBER = re.compile(r"(?:(?<![\w.])-)?[\d,]*\.?\d+")  # "10-20" is 10 and 20, not 10 and -20


def _to_number(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def extract_gsm8k(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: after the first ``####``, else the last number."""
    if "####" in text:
        tail = text.split("####", 1)[1].strip()
        m = _NUMBER.search(tail.replace("$", ""))
        return m.group(0).replace(",", "") if m else (tail.split("\n")[0].strip() or None)
    numbers = _NUMBER.findall(text.replace("$", ""))
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def gsm8k_correct(completion: str, reference: str) -> bool:
    """Numeric equality of the extracted answers (``reference`` may be a full solution or a number)."""
    got, want = extract_gsm8k(completion), extract_gsm8k(reference)
    if got is None or want is None:
        return False
    a, b = _to_number(got), _to_number(want)
    return a is not None and b is not None and abs(a - b) < 1e-6 * max(1.0, abs(b))


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), or ``\\boxed x``."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
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


def math_correct(completion: str, reference: str) -> bool:
    """Exact match of the normalised boxed answers (``reference``: a solution with a box, or the answer)."""
    got = last_boxed(completion)
    want = last_boxed(reference) or reference
    return got is not None and normalize_math(got) == normalize_math(want)


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
