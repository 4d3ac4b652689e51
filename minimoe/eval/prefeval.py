"""PrefEval (Zhao et al., 2025, "Do LLMs Recognize Your Preferences?"): does the model follow a preference
the user stated earlier in the conversation? EPnG reports it in Table 1 (accuracy, GPT-4o-mini as judge).

The protocol is the official one (github.com/amazon-science/PrefEval, generation task):

1. **The conversation.** Explicit preferences (``benchmark_dataset/explicit_preference/TOPIC.json``: rows
   ``preference``, ``question``, ``explanation``): the user states the preference, the model replies (its
   own reply, generated first and kept in the row as ``response_to_pref`` as the official result files
   do), optionally ``N`` unrelated turns follow (the first ``2N`` messages of
   ``benchmark_dataset/filtered_inter_turns.json``), then the user asks the ``question`` with
   `` (Please respond within W words.)`` (W = ``--max-new-tokens``; the official setting is 300) and, with
   ``--prefeval-method remind``, the official reminder. Implicit preferences (``implicit_preference/
   choice-based`` and ``persona-driven``) put the row's ``conversation`` there instead of the stated
   preference and the model's reply. The system prompt is the official ``You are a helpful assistant.``
2. **The judge.** Four yes/no checks per response, each the official prompt (``error_type/check_*.txt``,
   read from your PrefEval checkout: found above ``--data``, or ``--prefeval-prompts DIR``) under the
   official evaluator system prompt, answered in XML: ``acknowledge`` (does the response mention a
   preference, quoting it in ``<preference>``), ``violate`` (does it contradict the stated preference),
   ``hallucinate`` (is the quoted preference a different one; asked only when one was acknowledged,
   where its answer counts) and ``helpful`` (is it a substantive answer).
3. **The metric** (``get_preference_following_accuracy_generation_task.py``): a response follows the
   preference unless it is unhelpful or violates it; violations are split into inconsistent (acknowledged
   correctly, then violated), hallucination of preference (acknowledged a wrong one) and preference-unaware.
   ``preference_following_accuracy`` is the fraction of responses that follow it.

Verdicts are parsed as the official script does (the text of ``<answer>``, "yes"/"no" as substrings); an
answer that is not a plain Yes/No is counted in ``malformed_verdicts`` and decided the same way (a missing
``<answer>`` reads as no acknowledgement, no violation, helpful).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..data.dataset import prompt_text
from .judge import ChatJudge, JudgeError, VerdictCache
from .progress import partial_dir
from .tasks import Task, read_rows, register

SYSTEM_PROMPT = "You are a helpful assistant."  # config.yaml's system_prompt
JUDGE_SYSTEM = ("You are a helpful assistant in evaluating an AI assistant's reponse. You should be fair and strict "
                "and follow the user's instruction")  # llm_based_evaluation_errortypes.py, verbatim (typo included)
REMINDER = ("\nIn your response, please ensure that you take into account our earlier discussion, and provide an "
            "answer that is consistent with my preference.")
METHODS = ("zero-shot", "remind")
# the checks in the order the official evaluator asks them, and their prompt files under error_type/
CHECKS = {"acknowledge": "check_acknowledge.txt", "violate": "check_violation.txt",
          "hallucinate": "check_hallucination.txt", "helpful": "check_helpful.txt"}
ERRORS = ("unhelpful", "inconsistent", "hallucination_of_preference_violation", "preference_unaware_violation")


def read_prefeval(data: str | Path) -> list[dict]:
    """PrefEval rows from a topic file (a JSON array as published, or JSONL) or a directory of them (all
    topics of one form, e.g. ``benchmark_dataset/explicit_preference``). Each row gets its ``topic`` (the
    file's name) and a ``task_id`` ``TOPIC/i`` unless it has them. A row without a ``preference`` and a
    ``question`` string, or with a ``conversation`` of neither implicit form, is an error naming it."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"data file {data} does not exist")
    files = sorted(p for p in data.iterdir() if p.suffix in (".json", ".jsonl")) if data.is_dir() else [data]
    if not files:
        raise ValueError(f"{data}: no .json or .jsonl topic files")
    rows = []
    for path in files:
        if path.suffix == ".jsonl":
            items = read_rows(path)
        else:
            try:
                items = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(items, list) or not items:
                raise ValueError(f"{path}: expected a non-empty JSON array of PrefEval rows")
        for i, row in enumerate(items):
            where = f"{path}: row {i}"
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("preference", "question")):
                got = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{where}: PrefEval rows need 'preference' and 'question' strings (got {got})")
            form(row, where)
            rows.append({"topic": path.stem, "task_id": f"{path.stem}/{i}", **row})
    return rows


def form(row: dict, where: str = "row") -> str:
    """``explicit`` (no conversation), ``choice`` (a choice-based conversation: query, assistant_options,
    user_selection, assistant_acknowledgment) or ``persona`` (``{"0": {"user", "assistant"}, ...}``)."""
    conversation = row.get("conversation")
    if conversation is None:
        return "explicit"
    if isinstance(conversation, dict) and "query" in conversation:
        return "choice"
    if isinstance(conversation, dict) and all(isinstance(t, dict) and {"user", "assistant"} <= t.keys()
                                              for t in conversation.values()):
        return "persona"
    raise ValueError(f"{where}: 'conversation' is neither choice-based (query, assistant_options, ...) nor "
                     "persona-driven (turns of user/assistant)")


def history(row: dict) -> list[dict]:
    """The conversation before the inserted turns: the stated preference and the model's reply to it
    (explicit), or the row's implicit conversation, as chat messages."""
    kind = form(row)
    if kind == "explicit":
        if "response_to_pref" not in row:
            raise ValueError(f"PrefEval row {row.get('task_id')}: the model's reply to the preference is not generated "
                             "yet (response_to_pref)")
        return [{"role": "user", "content": row["preference"]},
                {"role": "assistant", "content": row["response_to_pref"]}]
    if kind == "choice":  # the official order: the dict's order, user for query and user_selection
        return [{"role": "user" if k in ("query", "user_selection") else "assistant", "content": v}
                for k, v in row["conversation"].items()]
    return [{"role": role, "content": turn[role]} for turn in row["conversation"].values()
            for role in ("user", "assistant")]


def inter_turns(path: str | Path, n: int) -> tuple[dict, ...]:
    """The first ``2n`` messages of ``filtered_inter_turns.json`` (its conversations concatenated), which
    must end with an assistant message, as the official ``extract_multi_turn_conversation`` takes them."""
    path = Path(path)
    try:
        convs = json.loads(path.read_text(encoding="utf-8"))
        messages = [{"role": m["role"], "content": m["content"]} for c in convs for m in c["conversation"]]
    except FileNotFoundError:
        raise FileNotFoundError(f"inter-turn file {path} does not exist (--prefeval-turns)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not PrefEval's filtered_inter_turns.json ({type(e).__name__}: {e})") from None
    if len(messages) < 2 * n:
        raise ValueError(f"{path}: {len(messages) // 2} turns, fewer than --prefeval-inter-turns {n}")
    if n and messages[2 * n - 1]["role"] != "assistant":
        raise ValueError(f"{path}: message {2 * n} is not the assistant's (the inserted turns must end with it)")
    return tuple(messages[:2 * n])


def find_in_checkout(data: str | None, relative: str) -> Path | None:
    """``relative`` (e.g. ``error_type``) in the PrefEval checkout that ``--data`` lies in: the first of
    ``--data``'s directories, from the nearest up, that holds it; None if none does."""
    if not data:
        return None
    start = Path(data).resolve()
    for d in ([start] if start.is_dir() else []) + list(start.parents):
        if (d / relative).exists():
            return d / relative
    return None


def load_checks(directory: str | Path) -> tuple[tuple[str, str], ...]:
    """The four judge prompts (``check_*.txt`` of PrefEval's ``error_type/``), by check name."""
    directory, checks = Path(directory), []
    for name, file in CHECKS.items():
        try:
            checks.append((name, (directory / file).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise FileNotFoundError(f"judge prompt {directory / file} does not exist (--prefeval-prompts is PrefEval's "
                                    "error_type/ directory)") from None
    return tuple(checks)


def tag(text: str, name: str) -> str | None:
    """The text of ``<name>`` in a judge's answer (unclosed: up to the end, as html.parser reads it), or None."""
    m = re.search(rf"<{name}>(.*?)(?:</{name}>|$)", text, re.DOTALL | re.IGNORECASE)
    return m.group(1).strip() if m else None


def classify(answers: dict[str, str]) -> tuple[bool, str | None, dict[str, bool]]:
    """The official decision from the four answers (lower-cased substrings, as the official script tests them):
    (follows the preference, error type or None, the acknowledgement/hallucination/violation flags)."""
    acknowledged = "yes" in answers.get("acknowledge", "").lower()
    hallucinated = acknowledged and "yes" in answers.get("hallucinate", "").lower()
    violated = "yes" in answers.get("violate", "").lower()
    unhelpful = "no" in answers.get("helpful", "").lower()
    error = None
    if unhelpful:
        error = "unhelpful"
    elif violated:
        error = ("preference_unaware_violation" if not acknowledged else
                 "hallucination_of_preference_violation" if hallucinated else "inconsistent")
    flags = {"acknowledgement": acknowledged, "hallucination": hallucinated, "violation": violated}
    return error is None, error, flags


@dataclass(frozen=True)
class PrefEval(Task):
    """PrefEval's generation task, judged by an LLM (see the module docstring for the protocol).

    Args:
        method: ``zero-shot`` or ``remind`` (the official reminder appended to the question).
        inter: the unrelated turns inserted before the question (chat messages).
        words: the word limit the question states (``--max-new-tokens``, as the official code ties them).
        checks: the judge prompts, ``(name, template)`` in the official order.
        judge: the judge client (None in the registry: ``configure`` makes it from the command line).
    """

    method: str = "zero-shot"
    inter: tuple[dict, ...] = ()
    words: int = 300
    checks: tuple[tuple[str, str], ...] = ()
    judge: ChatJudge | None = None

    def rows(self, data):
        if data is None:
            raise ValueError(f"task {self.name} needs --data (a PrefEval topic file or directory, e.g. "
                             "PrefEval/benchmark_dataset/explicit_preference)")
        return read_prefeval(data)

    def prepare(self, rows, tok, generate):
        """Explicit rows without ``response_to_pref``: the model's reply to the stated preference, generated."""
        todo = [i for i, r in enumerate(rows) if form(r) == "explicit" and "response_to_pref" not in r]
        if not todo:
            return rows
        replies = generate([prompt_text(tok, [{"role": "system", "content": SYSTEM_PROMPT},
                                              {"role": "user", "content": rows[i]["preference"]}]) for i in todo])
        rows = list(rows)
        for i, reply in zip(todo, replies, strict=True):
            rows[i] = {**rows[i], "response_to_pref": reply}
        return rows

    def messages(self, row: dict) -> list[dict]:
        """The chat the model answers: system prompt, history, inserted turns, the question."""
        question = row["question"] + (REMINDER if self.method == "remind" else "")
        question += f" (Please respond within {self.words} words.)"
        return [{"role": "system", "content": SYSTEM_PROMPT}, *history(row), *self.inter,
                {"role": "user", "content": question}]

    def prompt(self, row, tok):
        return prompt_text(tok, self.messages(row))

    def reference(self, row):
        """The preference the response is judged against."""
        return row["preference"]

    def grade_sample(self, row, completion, *, timeout=10.0, memory_mb=1024):
        """The four checks, asked as the official evaluator asks them; fields ``topic``, ``verdicts`` (each
        check's answer and the judge's explanation or quoted preference), ``malformed`` (checks whose answer
        is not a plain Yes/No), ``error`` and ``correct`` (follows the preference)."""
        if self.judge is None or not self.checks:
            raise ValueError(f"task {self.name} needs a judge (configure it with --judge-url and --judge-model)")
        templates, verdicts = dict(self.checks), {}
        fill = {"acknowledge": [("{end_generation}", completion), ("{question}", row["question"])],
                "violate": [("{preference}", row["preference"]), ("{question}", row["question"]),
                            ("{end_generation}", completion)],
                "helpful": [("{preference}", row["preference"]), ("{question}", row["question"]),
                            ("{end_generation}", completion)]}
        for check in CHECKS:
            if check == "hallucinate":  # only where a preference was acknowledged is this answer used
                if "yes" not in verdicts["acknowledge"]["answer"].lower():
                    continue
                fill[check] = [("{preference}", row["preference"]),
                               ("{assistant_restatement}", verdicts["acknowledge"]["preference"])]
            text = templates[check]
            for key, value in fill[check]:  # one after the other, in the official order
                text = text.replace(key, value)
            said = self.judge.ask([{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": text}])
            answer = tag(said, "answer")
            note = "preference" if check == "acknowledge" else "explanation"
            verdicts[check] = {"answer": answer or "", note: tag(said, note) or "", "malformed": not _plain(answer)}
        follows, error, _ = classify({k: v["answer"] for k, v in verdicts.items()})
        malformed = [k for k, v in verdicts.items() if v.pop("malformed")]
        return {"topic": row.get("topic"), "verdicts": verdicts, "malformed": malformed, "error": error,
                "correct": follows}

    def summarize(self, per_problem, ks=(1, 10)):
        """``preference_following_accuracy``: the fraction of all responses (samples) that follow it."""
        n = sum(len(c) for c in per_problem)
        return {"preference_following_accuracy": sum(sum(c) for c in per_problem) / n}

    def summarize_records(self, records):
        """The official error-type breakdown (counts over responses), malformed verdicts, accuracy per topic."""
        counts = dict.fromkeys(("acknowledgement", "hallucination", "violation"), 0)
        errors, topics = dict.fromkeys(ERRORS, 0), {}
        for r in records:
            _, error, flags = classify({k: v["answer"] for k, v in r["verdicts"].items()})
            for k, flag in flags.items():
                counts[k] += flag
            if error:
                errors[error] += 1
            topics.setdefault(r.get("topic"), []).append(r["correct"])
        return {"responses": len(records), **counts, "errors": errors,
                "malformed_verdicts": sum(len(r["malformed"]) for r in records),
                "accuracy_by_topic": {t: sum(c) / len(c) for t, c in topics.items()}}

    def grading_info(self):
        info = {"method": self.method, "inter_turns": len(self.inter) // 2, "words": self.words}
        return {**info, **({"judge": self.judge.info()} if self.judge else {})}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("prefeval (an LLM judge behind any OpenAI-compatible chat endpoint)")
        g.add_argument("--judge-url", default="https://api.openai.com/v1",
                       help="the judge's endpoint or its base URL (default https://api.openai.com/v1; a local vLLM "
                            "server: http://localhost:8000/v1)")
        g.add_argument("--judge-model", default="gpt-4o-mini", help="the judge model (default gpt-4o-mini, EPnG's)")
        g.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the judge's API key (default OPENAI_API_KEY; '' for none)")
        g.add_argument("--judge-cache", type=Path, help="verdict cache, JSONL (default OUT.partial/judge-cache.jsonl; "
                       "a file of your own keeps verdicts across evaluations)")
        g.add_argument("--judge-max-tokens", type=int, default=100, help="judge answer limit (default 100, official)")
        g.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request (default 60)")
        g.add_argument("--judge-retries", type=int, default=6,
                       help="retries of a request on 429/5xx/timeouts, with exponential backoff (default 6)")
        g.add_argument("--prefeval-method", choices=METHODS, default="zero-shot",
                       help="zero-shot (default) or remind (the official reminder after the question)")
        g.add_argument("--prefeval-inter-turns", type=int, default=0,
                       help="unrelated turns inserted before the question (default 0)")
        g.add_argument("--prefeval-turns", type=Path, help="PrefEval's filtered_inter_turns.json (default: found "
                       "in the checkout --data lies in, benchmark_dataset/)")
        g.add_argument("--prefeval-prompts", type=Path, help="PrefEval's error_type/ directory of judge prompts "
                       "(default: found in the checkout --data lies in)")

    def configure(self, args):
        """The task with its judge, prompts, method and inserted turns; a missing key, prompt or turn file is
        reported here, before a model is loaded."""
        prompts = args.prefeval_prompts or find_in_checkout(args.data, "error_type")
        if prompts is None:
            raise FileNotFoundError("PrefEval's judge prompts (error_type/check_*.txt of github.com/amazon-science/"
                                    "PrefEval) were not found in a directory above --data; pass --prefeval-prompts DIR")
        inter = ()
        if args.prefeval_inter_turns < 0:
            raise ValueError("--prefeval-inter-turns must be >= 0")
        if args.prefeval_inter_turns:
            turns = args.prefeval_turns or find_in_checkout(args.data, "benchmark_dataset/filtered_inter_turns.json")
            if turns is None:
                raise FileNotFoundError("PrefEval's filtered_inter_turns.json was not found in a directory above "
                                        "--data; pass --prefeval-turns FILE")
            inter = inter_turns(turns, args.prefeval_inter_turns)
        cache = args.judge_cache or partial_dir(args.out) / "judge-cache.jsonl"
        judge = ChatJudge(args.judge_url, args.judge_model, args.judge_key_env, VerdictCache(cache),
                          max_tokens=args.judge_max_tokens, timeout=args.judge_timeout, retries=args.judge_retries)
        judge.check_key()
        return replace(self, method=args.prefeval_method, inter=inter, words=args.max_new_tokens,
                       checks=load_checks(prompts), judge=judge)


def _plain(answer: str | None) -> bool:
    """Whether a judge's ``<answer>`` is a plain Yes or No (brackets and a full stop allowed)."""
    return answer is not None and answer.strip("[]().* ").lower() in ("yes", "no")


register(PrefEval("prefeval", "PrefEval preference following, judged by an LLM (preference, question[, conversation]) "
                              "rows; --judge-url/--judge-model"))

__all__ = ["PrefEval", "JudgeError", "classify", "read_prefeval", "tag"]
