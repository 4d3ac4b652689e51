"""The benchmarks of ``minimoe eval``, one object per task, in a registry that ``minimoe eval`` and
:mod:`minimoe.eval.runners` look tasks up in by name.

Tasks and metrics (the papers'):
    gsm8k       exact match of the final number (``question``/``answer`` rows)
    math        exact match of the ``\\boxed{}`` / "The answer is:" answer (``problem``/``solution`` rows),
                by math-verify where installed, else Hendrycks' normalisation (``--math-grader``)
    mc          multiple choice: ARC, OpenBookQA, ScienceQA (text-only), MMLU rows as distributed, or
                ``question``, ``choices``, ``answer`` (:mod:`minimoe.data.mc_rows`), by option
                log-likelihood (``--mc-mode loglik``) or by generated letter (``letter``)
    humaneval   pass@k (``task_id``, ``prompt``, ``test``, ``entry_point``), programs run in a sandbox
    mbpp        pass@k (``task_id``, ``text``, ``test_list``[, ``test_setup_code``])
    perplexity  exp(mean token NLL) over a JSONL (``text`` or prompt/response) or plain-text file
    tiny-arith  GSM8K exact match on the built-in test split
    tiny-mix    the same on the built-in tiny-mix (four skills, harder for the dense tiny model)

Everything that differs between benchmarks (where the rows come from, the prompt, the grader, the
summary metric, and whether the model generates, scores options or is measured by perplexity) is a
method of its :class:`Task`, so the runners dispatch on none of the names and adding a benchmark is one
subclass and one :func:`register` call::

    class Reverse(Task):
        def prompt(self, row, tok):
            return row["text"]

        def correct(self, row, completion):
            return completion.strip() == row["text"][::-1]

    register(Reverse("reverse", "reverse a string (text rows), exact match"))

This module imports no model code and never :mod:`minimoe.eval.runners` (which imports it), so there is
no import cycle: what runs a model (generation, log-likelihoods, perplexity) stays there, and a task
only names which of those scores it (:attr:`Task.scoring`).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..data.sources import holds_records, read_records
from ..data.builtin import builtin_split
from ..data.dataset import prompt_text
from .sandbox import humaneval_program, mbpp_program, run_program, sandbox_info
from ..data.mc_rows import LETTERS, mc_prompt, mc_row, mc_rows
from .scoring import extract_choice, gsm8k_correct, math_correct, math_grader, pass_at_k

if TYPE_CHECKING:
    from ..model.tokenizer import Tokenizer

# How a task is scored with a model (Task.scoring): the runners of minimoe.eval.runners behind each.
GENERATE = "generate"  # sample completions, then grade each one (the only kind --completions can score)
OPTION_LOGLIK = "option-loglik"  # the log-likelihood of each option (mc rows: question, choices, answer)
PERPLEXITY = "perplexity"  # exp(mean token NLL) of the documents

CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")


def read_rows(path: str | Path) -> list[dict]:
    """The records of a data spec; a missing, malformed or empty one is an error naming it (and the line).

    Args:
        path: a local JSON array, JSONL, gzip (HumanEval.jsonl.gz as distributed) or Parquet file, or a Hub
            dataset (``hf://datasets/OWNER/NAME/FILE``, ``OWNER/NAME:FILE``, ``OWNER/NAME[:DIR]@SPLIT``):
            see :mod:`minimoe.data.sources`.
    """
    return [record for _, record in read_records(str(path))]


@dataclass(frozen=True)
class Task:
    """One benchmark: its rows, prompts, grader, summary metric and how a model is scored on it.

    The defaults are those of a generated-answer, exact-match benchmark read from ``--data``: a subclass
    defines :meth:`prompt` and :meth:`correct` and overrides the rest only where it differs. Instances are
    frozen (the registry's objects are shared); an option of the command line reaches a task through
    :meth:`add_arguments` and :meth:`configure`, which returns a configured copy.

    Args:
        name: the ``--task`` name and registry key.
        description: one line for ``minimoe eval --help`` (metric and row fields).
    """

    name: str
    description: str

    @property
    def scoring(self) -> str:
        """How a model is scored: ``GENERATE`` (then :meth:`grade_sample`), ``OPTION_LOGLIK`` or ``PERPLEXITY``."""
        return GENERATE

    def rows(self, data: str | None) -> list[dict]:
        """The problems, from the ``--data`` JSONL file, which is required: no benchmark data is downloaded.

        Args:
            data: the ``--data`` path, or None when it was not given.
        """
        if data is None:
            raise ValueError(f"task {self.name} needs --data FILE (no benchmark data is downloaded)")
        return read_rows(data)

    def prompt(self, row: dict, tok: Tokenizer) -> str:
        """The text the model continues for ``row`` (formatted the way training formats prompts)."""
        raise NotImplementedError(f"task {self.name} defines no prompt()")

    def correct(self, row: dict, completion: str) -> bool:
        """Whether ``completion`` answers ``row`` (what the default :meth:`grade_sample` records)."""
        raise NotImplementedError(f"task {self.name} defines no correct()")

    def grade_sample(self, row: dict, completion: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> dict:
        """The grading fields of one sample's record: ``correct`` and any others (code adds ``status`` and
        ``detail``), in the order they are written to ``samples.jsonl`` (``correct`` always last).

        Args:
            row: the problem.
            completion: one generated (or ``--completions``) sample for it.
            timeout: seconds a generated program may run (code tasks).
            memory_mb: address-space limit of a generated program (code tasks).
        """
        return {"correct": self.correct(row, completion)}

    def reference(self, row: dict):
        """What a completion of ``row`` is graded against, recorded in ``samples.jsonl`` so a record can be read
        on its own: the row's ``answer``, else its ``solution`` or ``reference``; None (not recorded) if none."""
        return next((row[k] for k in ("answer", "solution", "reference") if k in row), None)

    def grading_info(self) -> dict:
        """How the grading was done, for summary.json (code tasks: the sandbox); nothing by default."""
        return {}

    def prepare(self, rows: list[dict], tok: Tokenizer, generate) -> list[dict]:
        """The rows ready to be prompted. A task whose prompt holds the model's own earlier reply (PrefEval's
        stated preference, answered first) generates it here with ``generate(prompts) -> [completion]``;
        by default the rows as they are.

        Args:
            rows: the problems.
            tok: the model's tokenizer.
            generate: one completion per prompt, with the run's decoding settings (kept in ``OUT.partial``).
        """
        return rows

    def summarize_records(self, records: list[dict]) -> dict:
        """More of the summary, from the graded records (the fields :meth:`grade_sample` returned, e.g. an
        error-type breakdown); nothing by default."""
        return {}

    def summarize(self, per_problem: list[list[bool]], ks=(1, 10)) -> dict:
        """The metric over problems from each problem's per-sample correctness: exact match, which with
        n > 1 samples per problem is the mean over all samples (greedy n = 1 is the papers' setting).

        Args:
            per_problem: ``per_problem[i][j]``: whether sample j of problem i is correct.
            ks: the pass@k values asked for (unused by exact match).
        """
        return {"exact_match": sum(sum(c) / len(c) for c in per_problem) / len(per_problem)}

    def check_completions(self) -> None:
        """Raise ValueError if completions from another tool cannot be scored: only generated answers can
        be graded without the model, log-likelihoods and perplexity need it."""
        if self.scoring != GENERATE:
            raise ValueError(f"--completions cannot score {self.name} by log-likelihood")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the task's own command-line options to ``minimoe eval``'s parser (none by default)."""

    def configure(self, args: argparse.Namespace) -> Task:
        """This task with its options of :meth:`add_arguments` taken from ``args`` (itself by default)."""
        return self


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a benchmark to the registry: ``minimoe eval --task`` (choices and help) and the functions of
    :mod:`minimoe.eval.runners` find it by name. A name is registered once (no silent replacement).

    Args:
        task: the task object; returned, so registration can sit where the object is made.
    """
    if not isinstance(task, Task):
        raise TypeError(f"register() takes a Task, got {type(task).__name__}")
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``; an unknown name is a ValueError listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})") from None


class GSM8K(Task):
    """Exact match of the final number (``question``/``answer`` rows; the answer a solution or a number)."""

    def prompt(self, row, tok):
        return prompt_text(tok, row["question"])

    def correct(self, row, completion):
        return gsm8k_correct(completion, str(row["answer"]))


class Builtin(GSM8K):
    """GSM8K-style grading on the test split of the built-in task of the same name
    (:mod:`minimoe.data.builtin`; ``--data`` is not needed, and not read)."""

    def rows(self, data):
        return [{"question": q, "answer": a} for q, a in builtin_split(self.name, "test")]


@dataclass(frozen=True)
class Math(Task):
    """The completion's marked answer (last ``\\boxed{}``, or MetaMathQA's "The answer is:") against the
    row's ``answer`` or its solution's, equal by math-verify or by Hendrycks' normalisation.

    Args:
        grader: ``"auto"`` (math-verify where it is installed), ``"math-verify"`` (an error without it) or
            ``"normalisation"`` (Hendrycks' alone, as before math-verify existed); ``minimoe eval --math-grader``.
    """

    grader: str = "auto"
    GRADERS: ClassVar[dict[str, bool | None]] = {"auto": None, "math-verify": True, "normalisation": False}

    def __post_init__(self):
        if self.grader not in self.GRADERS:
            raise ValueError(f"MATH grader {self.grader!r} is not one of {', '.join(self.GRADERS)}")

    def prompt(self, row, tok):
        return prompt_text(tok, row["problem"])

    def correct(self, row, completion):
        return math_correct(completion, str(row.get("answer") or row["solution"]), self.GRADERS[self.grader])

    def grading_info(self):
        """``{"grader": "math-verify 0.9.0"}`` or ``{"grader": "hendrycks-normalisation"}``."""
        return {"grader": math_grader(self.GRADERS[self.grader])}

    def add_arguments(self, parser):
        parser.add_argument("--math-grader", choices=list(self.GRADERS), default=self.grader,
                            help="MATH answers equal by: math-verify where installed (auto, the default; "
                                 "pip install 'minimoe[math]'), math-verify, or Hendrycks' normalisation alone")

    def configure(self, args):
        task = replace(self, grader=getattr(args, "math_grader", None) or self.grader)
        if task.grader == "math-verify":
            task.grading_info()  # without the package: an error before anything runs
        return task


def _scored_form(row: dict) -> dict:
    """A multiple-choice row as :meth:`MultipleChoice.rows` returns it (answer an index), also when it was not
    read through it (a row of another layout, or a letter answer, handed to the task directly)."""
    if isinstance(row.get("answer"), int) and isinstance(row.get("choices"), list):
        return row
    return mc_row(row) or row


@dataclass(frozen=True)
class MultipleChoice(Task):
    """Multiple choice scored by option log-likelihood (``mode="loglik"``: the model is not asked to write
    anything) or by the letter it generates (``"letter"``: a prompt listing the options, then graded).

    The mode is the task's own option ``--mc-mode``: :meth:`add_arguments` declares it and
    :meth:`configure` returns the task in the chosen mode. The registered object keeps the default mode;
    grading a completion does not depend on the mode (a completion is always a letter answer).

    Args:
        mode: ``"loglik"`` or ``"letter"``.
        skipped: what the last :meth:`rows` left out, ``{"image": N}``, for summary.json. The one field filled
            in place (the object is otherwise frozen); :meth:`configure` gives each configured copy its own.
    """

    mode: str = "loglik"
    skipped: dict = field(default_factory=dict, compare=False, repr=False)
    MODES: ClassVar[tuple[str, ...]] = ("loglik", "letter")

    def __post_init__(self):
        if self.mode not in self.MODES:
            raise ValueError(f"multiple-choice mode {self.mode!r} is not one of {', '.join(self.MODES)}")

    @property
    def scoring(self):
        return OPTION_LOGLIK if self.mode == "loglik" else GENERATE

    def rows(self, data):
        """The rows in the form scored (:func:`~minimoe.data.mc_rows.mc_rows`: ARC, OpenBookQA, ScienceQA, MMLU
        or minimoe's own layout); rows with an image are left out and counted in :attr:`skipped`."""
        if data is None:
            return super().rows(data)  # the error naming --data
        rows, images = mc_rows(read_records(str(data)), str(data))
        self.skipped.clear()
        if images:
            self.skipped["image"] = images
        return rows

    def grading_info(self):
        """The rows left out (``{"skipped_rows": {"image": N}}``), where there were any."""
        return {"skipped_rows": dict(self.skipped)} if self.skipped else {}

    def prompt(self, row, tok):
        row = _scored_form(row)
        return prompt_text(tok, mc_prompt(row))

    def correct(self, row, completion):
        row = _scored_form(row)
        return extract_choice(completion, LETTERS[:len(row["choices"])]) == LETTERS[row["answer"]]

    def reference(self, row):
        """The correct option as the letter prompt lists it, e.g. ``"B. green"``."""
        row = _scored_form(row)
        return f"{LETTERS[row['answer']]}. {row['choices'][row['answer']]}"

    def check_completions(self):
        if self.scoring != GENERATE:
            raise ValueError(f"--completions cannot score {self.name} by log-likelihood "
                             "(use --mc-mode letter for multiple choice)")

    def add_arguments(self, parser):
        parser.add_argument("--mc-mode", choices=self.MODES, default=self.mode,
                            help=f"multiple-choice scoring (default {self.mode})")

    def configure(self, args):
        return replace(self, mode=getattr(args, "mc_mode", self.mode), skipped={})


@dataclass(frozen=True)
class CodeTask(Task):
    """Generated programs run against the problem's tests in a sandboxed child process; pass@k.

    Args:
        stops: without a fenced block, the completion is cut at the first of these (HumanEval's
            completions continue a function body; MBPP's are whole programs and are kept whole).
        sandbox: how programs are isolated (``minimoe eval --sandbox``): ``"process"`` or ``"bwrap"``.
    """

    stops: tuple[str, ...] = ()
    sandbox: str = "process"

    def program(self, row: dict, code: str) -> str:
        """The program to run: the problem's code around ``code``, then its tests."""
        raise NotImplementedError(f"task {self.name} defines no program()")

    def code(self, completion: str) -> str:
        """The program text of a completion: a fenced block's content when there is one (any info string:
        ```python, ```py, ```Python, ```), else the text up to the first of :attr:`stops`."""
        block = re.search(r"```[^\n]*\n(.*?)(?:```|$)", completion, re.DOTALL)
        if block:
            return block.group(1)
        cut = min([completion.find(s) for s in self.stops if s in completion] or [len(completion)])
        return completion[:cut]

    def grade_sample(self, row, completion, *, timeout=10.0, memory_mb=1024):
        result = run_program(self.program(row, self.code(completion)), timeout, memory_mb, sandbox=self.sandbox)
        return {"status": result.status, "detail": result.detail[-300:], "correct": result.passed}

    def grading_info(self):
        return sandbox_info(self.sandbox)

    def configure(self, args):
        """The task with ``minimoe eval --sandbox`` (an option of minimoe eval, shared by the code tasks)."""
        return replace(self, sandbox=getattr(args, "sandbox", None) or self.sandbox)

    def summarize(self, per_problem, ks=(1, 10)):
        """Unbiased pass@k for each k <= n (the fewest samples of any problem); none is an error."""
        n = min(len(c) for c in per_problem)
        scores = {f"pass@{k}": sum(pass_at_k(len(c), sum(c), k) for c in per_problem) / len(per_problem)
                  for k in ks if k <= n}
        if not scores:
            raise ValueError(f"pass@k needs n >= k samples per problem; got n={n}, k={list(ks)}")
        return scores


class HumanEval(CodeTask):
    """The prompt is the function's signature and docstring; the program is prompt + body + ``check``."""

    def prompt(self, row, tok):
        return row["prompt"]

    def program(self, row, code):
        return humaneval_program(row, code)

    def reference(self, row):
        """The tests the program is run against."""
        return row["test"]


class MBPP(CodeTask):
    """The prompt is the description and the asserts; the program is the code, setup, imports, asserts."""

    def prompt(self, row, tok):
        tests = "\n".join(row.get("test_list", []))
        return prompt_text(tok, f"{row['text']}\nYour code should pass these tests:\n{tests}")

    def program(self, row, code):
        return mbpp_program(row, code)

    def reference(self, row):
        """The asserts the program is run against."""
        return "\n".join(row.get("test_list", []))


class Perplexity(Task):
    """Perplexity of the documents: a JSONL file (``text`` or prompt/response rows) or any other file as
    one plain-text document. Nothing is generated, so there are no prompts and nothing to grade."""

    @property
    def scoring(self):
        return PERPLEXITY

    def rows(self, data):
        if data is not None and not holds_records(str(data)):
            return [{"text": Path(data).read_text(encoding="utf-8")}]
        return super().rows(data)

    def prompt(self, row, tok):
        raise ValueError(f"task {self.name} is scored by perplexity: it has no prompts")

    def reference(self, row):
        return None

    def grade_sample(self, row, completion, *, timeout=10.0, memory_mb=1024):
        raise ValueError(f"task {self.name} is scored by perplexity: it has no completions to grade")


register(GSM8K("gsm8k", "exact match of the final number (question/answer rows)"))
register(Math("math", "exact match of the \\boxed{} or 'The answer is:' answer (problem/solution rows); "
                      "--math-grader"))
register(MultipleChoice("mc", "multiple choice: ARC, OpenBookQA, ScienceQA (text-only), MMLU rows, or question, "
                              "choices, answer index or letter; --mc-mode loglik|letter"))
register(HumanEval("humaneval", "pass@k (task_id, prompt, test, entry_point), programs run in a sandbox",
                   stops=CODE_STOPS))
register(MBPP("mbpp", "pass@k (task_id, text, test_list[, test_setup_code]), programs run in a sandbox"))
register(Perplexity("perplexity", "exp(mean token NLL) over a JSONL (text or prompt/response) or text file"))
register(Builtin("tiny-arith", "GSM8K exact match on the built-in test split (no --data)"))
register(Builtin("tiny-mix", "GSM8K exact match on the built-in tiny-mix test split (no --data)"))
