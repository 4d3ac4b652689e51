"""The row layouts of the multiple-choice benchmarks, as distributed, read into one form, and the prompt that
shows them (the same in training, ``minimoe train --data``, and in evaluation, ``minimoe eval --task mc``).

``minimoe eval --task mc`` scores rows of the form ``{"question": str, "choices": [str, ...], "answer": int}`` (the
index of the correct choice). :func:`mc_rows` turns each benchmark's own rows into that form, so its files are
used as downloaded (Hub datasets by their id):

==================================  ============================================================================
ARC, OpenBookQA (AllenAI's JSONL)   ``question: {stem, choices: [{text, label}, ...]}``, ``answerKey``
ARC (allenai/ai2_arc)               ``question`` (str), ``choices: {text: [...], label: [...]}``, ``answerKey``
OpenBookQA (allenai/openbookqa)     ``question_stem``, ``choices: {text: [...], label: [...]}``, ``answerKey``
ScienceQA (derek-thomas/ScienceQA)  ``question``, ``choices`` (list), ``answer`` (index), ``hint``, ``image``
MMLU (cais/mmlu)                    ``question``, ``choices`` (list), ``answer`` (index)
minimoe's own                       ``question``, ``choices`` (list), ``answer`` (index or letter A, B, ...)
==================================  ============================================================================

Labels may be letters or digits (some ARC rows are labelled "1".."4"); the answer is looked up among the row's
own labels and the options are always shown to the model as A, B, C, ... ScienceQA rows with an image are
skipped (the papers score its text-only questions) and counted; a non-empty ``hint`` is the question's context
and goes before it. The row's other fields stay (``id``, MMLU's ``subject``, ScienceQA's ``grade``), so
``--data-filter`` can select by them. A row that fits none of the layouts is an error naming the file, the
line (or row) and its keys.
"""

from __future__ import annotations

from numbers import Integral

LETTERS = "ABCDEFGHIJ"  # the option letters the model sees (at most 10 options)
_READ = ("question", "question_stem", "choices", "answer", "answerKey", "hint", "image")  # what mc_row rewrites
_EXPECTED = ("question (or question.stem, question_stem), choices (a list of texts, a list of {text, label}, or "
             "{text: [...], label: [...]}) and answer (an index or label) or answerKey (a label)")


class RowError(ValueError):
    """A row that is not a multiple-choice row of a known layout (the message says what it has)."""


def _has_image(row: dict) -> bool:
    """Whether a ScienceQA row comes with an image: a file name, or a Hub Image feature's {bytes, path}."""
    image = row.get("image")
    if isinstance(image, dict):
        return any(v for v in image.values())
    return bool(image)


def _choices(choices) -> tuple[list[str], list[str]]:
    """(texts, labels) of a row's ``choices`` in any of the layouts; labels are A, B, ... for a plain list."""
    if isinstance(choices, dict) and isinstance(choices.get("text"), list):
        texts, labels = choices["text"], choices.get("label") or list(LETTERS[:len(choices["text"])])
    elif isinstance(choices, list) and all(isinstance(c, dict) and "text" in c for c in choices):
        texts = [c["text"] for c in choices]
        labels = [c.get("label", LETTERS[i] if i < len(LETTERS) else "") for i, c in enumerate(choices)]
    elif isinstance(choices, list) and all(isinstance(c, (str, int, float)) for c in choices):
        texts, labels = choices, list(LETTERS[:len(choices)])
    else:
        raise RowError("its choices are neither a list of texts, a list of {text, label} nor {text: [...], "
                       "label: [...]}")
    if not 2 <= len(texts) <= len(LETTERS) or len(labels) != len(texts):
        raise RowError(f"it has {len(texts)} choices and {len(labels)} labels (2 to {len(LETTERS)} choices, "
                       "one label each)")
    return [str(t) for t in texts], [str(label).strip() for label in labels]


def _answer(row: dict, labels: list[str]) -> int:
    """The index of the correct choice: ``answerKey`` (a label), or ``answer`` (an index, or a label)."""
    key = row["answerKey"] if "answerKey" in row else row["answer"]
    if isinstance(key, Integral) and not isinstance(key, bool) and "answerKey" not in row:
        if not 0 <= key < len(labels):
            raise RowError(f"its answer index {key} is not one of 0..{len(labels) - 1}")
        return int(key)
    if str(key).strip() not in labels:
        raise RowError(f"its answer {key!r} is not one of its labels {', '.join(labels)}")
    return labels.index(str(key).strip())


def mc_row(row: dict) -> dict | None:
    """One row in the form ``minimoe eval`` scores: ``{"question", "choices", "answer"}`` (``answer`` an index)
    followed by the row's other fields, or None for a row with an image. A RowError says why not."""
    if not isinstance(row, dict):
        raise RowError(f"it is a {type(row).__name__}, not an object")
    if _has_image(row):
        return None
    question, choices = row.get("question"), row.get("choices")
    if isinstance(question, dict):  # AllenAI's own JSONL: the stem and the choices under "question"
        question, choices = question.get("stem"), question.get("choices", choices)
    elif question is None:
        question = row.get("question_stem")  # OpenBookQA on the Hub
    if not isinstance(question, str) or choices is None or ("answer" not in row and "answerKey" not in row):
        raise RowError(f"it is no multiple-choice row of a known layout: expected {_EXPECTED}")
    texts, labels = _choices(choices)
    hint = row.get("hint")
    if isinstance(hint, str) and hint.strip():  # ScienceQA: the passage or situation the question is about
        question = f"Context: {hint.strip()}\n{question}"
    out = {"question": question, "choices": texts, "answer": _answer(row, labels)}
    return out | {k: v for k, v in row.items() if k not in _READ}


def mc_prompt(row: dict) -> str:
    """The question and its lettered options, as the model is trained and asked: the answer is the letter."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    return f"{row['question']}\n{options}\nAnswer with the letter of the correct option."


def is_mc(record: dict) -> bool:
    """Whether a record looks like a multiple-choice row (its choices and a labelled answer)."""
    return ("choices" in record or isinstance(record.get("question"), dict)) and (
        "answer" in record or "answerKey" in record)


def mc_rows(records: list[tuple[str, dict]], source: str) -> tuple[list[dict], int]:
    """The rows in the form ``minimoe eval`` scores, and how many were skipped for an image.

    Args:
        records: ``(where, row)`` in file order, as :func:`minimoe.data.sources.read_records` gives them (``where``:
            ``FILE:LINE``, ``FILE:LINE (item I)`` or ``FILE: row I``).
        source: the data spec, for the error of a file without a text-only row.

    Raises:
        ValueError: a row that fits no layout (``WHERE: why (its keys: ...)``), or no text-only row at all.
    """
    out, skipped = [], 0
    for where, row in records:
        try:
            mc = mc_row(row)
        except RowError as e:
            keys = ", ".join(map(str, row)) if isinstance(row, dict) else "none"
            raise ValueError(f"{where}: {e} (its keys: {keys})") from None
        if mc is None:
            skipped += 1
        else:
            out.append(mc)
    if not out:
        raise ValueError(f"{source}: no text-only multiple-choice rows ({skipped} rows with an image skipped)")
    return out, skipped
