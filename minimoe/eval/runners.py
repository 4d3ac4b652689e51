"""Task runners behind ``minimoe eval``: generate (batched, KV cache) or score log-likelihoods, then grade.

The tasks and their metrics (gsm8k, math, mc, humaneval, mbpp, perplexity, tiny-arith) are listed in
:mod:`minimoe.eval.tasks`, one object per task in its registry: where its rows come from, its prompt, its
grader, its summary metric and which runner scores it (``Task.scoring``). This module holds what the tasks
share (decoding settings, batched generation, option log-likelihoods, perplexity, the grading loop, the
result files) and the functions ``minimoe train`` and ``minimoe eval`` call with a task's name, which look the task
up in the registry. It imports :mod:`minimoe.eval.tasks`, never the other way round.
Every run records its decoding settings; per-sample records go to ``samples.jsonl``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..data.sources import select
from ..data.dataset import prompt_text
from ..parallel.distributed import World
from .progress import Progress
from .tasks import CODE_STOPS, GENERATE, OPTION_LOGLIK, PERPLEXITY, Task, get_task, read_rows
from .tasks import TASKS as _REGISTRY

__all__ = ["CODE_STOPS", "Decoding", "clean_code", "generate_all", "grade", "mc_loglik", "option_loglik",
           "perplexity", "read_rows", "run_task", "task_prompt", "task_rows", "write_results"]


def __getattr__(name: str):
    # TASKS: the registered names, read at each access so a task registered later is among them
    if name == "TASKS":
        return tuple(_REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _task(task: str | Task) -> Task:
    """A task object from its name (through the registry), or the object itself (e.g. a configured one)."""
    return task if isinstance(task, Task) else get_task(task)


@dataclass
class Decoding:
    """The sampling settings of a run, written into its summary.json so a score says how it was produced."""

    max_new_tokens: int = 256
    n: int = 1  # samples per problem (pass@k needs n >= k)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0


def task_rows(task: str | Task, data: str | None, limit: int | None, filters=()) -> list[dict]:
    """The problems of a task (``Task.rows``: a built-in split, or ``--data``), the first ``limit`` if given.

    Args:
        task: a registered task's name, or a task object.
        data: the ``--data`` spec (a file or Hub dataset: :mod:`minimoe.data.sources`), or None.
        limit: score only the first ``limit`` problems (None or 0: all).
        filters: ``--data-filter`` ``KEY=VALUE`` strings, applied before ``limit`` (e.g. ``type=Algebra``).
    """
    rows = _task(task).rows(data)
    if filters:
        rows = [row for _, row in select([(f"{data}: problem {i}", row) for i, row in enumerate(rows)], filters,
                                         str(data))]
    return rows[:limit] if limit else rows


def task_prompt(task: str | Task, row: dict, tok) -> str:
    """The prompt the model continues for ``row`` (``Task.prompt``).

    Args:
        task: a registered task's name, or a task object.
        row: one problem of :func:`task_rows`.
        tok: the model's tokenizer (prompts are formatted the way training formats them).
    """
    return _task(task).prompt(row, tok)


@torch.no_grad()
def generate_all(model, tok, prompts: list[str], dec: Decoding, progress: bool = True,
                 world: World = World()) -> list[list[str]]:
    """``dec.n`` completions per prompt, batched with left padding and a KV cache.

    The jobs (prompt, sample) are cut into batches of ``dec.batch_size`` in order and batch b samples from its
    own generator (seed ``dec.seed``, b), so a completion depends only on its batch: with several processes
    (``world``), process r generates batches r, r + N, ... and every process gets all completions back,
    exactly those one process would generate."""
    from tqdm.auto import tqdm

    device = model.device
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(dec.n)]
    mine: list[tuple[int, str]] = []  # (job, completion)
    starts = list(range(0, len(jobs), dec.batch_size))
    for b in tqdm(range(len(starts)), disable=not progress or not world.main, desc="generate"):
        if b % world.size != world.rank:
            continue
        chunk = [(job, jobs[job][1]) for job in range(starts[b], min(len(jobs), starts[b] + dec.batch_size))]
        g = torch.Generator(device=device).manual_seed(dec.seed * 1_000_003 + b)
        batch = tok.batch([p for _, p in chunk], padding_side="left")
        ids = batch["input_ids"].to(device)
        new = model.generate(ids, attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=dec.max_new_tokens, do_sample=dec.temperature > 0,
                             temperature=dec.temperature or 1.0, top_p=dec.top_p, eos_token_id=tok.eos_token_ids,
                             pad_token_id=tok.pad_token_id, generator=g)
        for (job, _), row in zip(chunk, new[:, ids.shape[1]:].tolist()):
            row = [t for t in row if t not in tok.eos_token_ids and t != tok.pad_token_id]
            mine.append((job, tok.decode(row)))
    out: list[list[str]] = [[] for _ in prompts]
    for job, text in sorted(x for part in world.gather(mine) for x in part):
        out[jobs[job][0]].append(text)
    return out


def clean_code(task: str | Task, completion: str) -> str:
    """The program text of a code task's completion (``CodeTask.code``): a fenced block's content when there
    is one (any info string: ```python, ```py, ```Python, ```), else for HumanEval the text up to the first
    stop sequence (MBPP keeps the whole completion)."""
    return _task(task).code(completion)


def _prompt(task: Task, row: dict) -> str | None:
    """The prompt of ``row`` when it does not depend on a model's template (HumanEval's does not), else None:
    a prompt recorded without a model (``--completions``) must be the one a model would have seen."""
    try:
        return task.prompt(row, None)
    except Exception:  # needs the tokenizer's template, or the task has no prompts
        return None


def grade(task: str | Task, rows: list[dict], completions: list[list[str]], ks=(1, 10), timeout: float = 10.0,
          memory_mb: int = 1024, world: World = World(), prompts: list[str] | None = None,
          progress: Progress | None = None) -> tuple[dict, list[dict]]:
    """Score completions with the task's grader and summarise them with its metric.

    Args:
        task: a registered task's name, or a task object.
        rows: the problems.
        completions: ``completions[i]`` are problem i's samples.
        ks: pass@k values (code tasks; those above the samples per problem are left out).
        timeout: seconds per generated program (code tasks).
        memory_mb: address-space limit per generated program (code tasks).
        world: several processes: each grades problems i with i % N == rank; all get every result.
        prompts: the prompts the model saw (recorded); without them, the task's prompt where it needs no model.
        progress: where graded problems are kept as they are graded (``OUT.partial``); problems found there
            are not graded again.

    Returns:
        (summary, per-sample records): ``{"problems": N, **metric, **task.grading_info()}`` and, per sample, its
        index, sample number, task_id, completion, prompt and reference (where they exist), then the task's
        grading fields (``correct`` last).
    """
    task = _task(task)
    done = progress.graded() if progress else {}
    graded = []  # (problem, its records)
    for i, (row, samples) in enumerate(zip(rows, completions)):
        if i % world.size != world.rank:
            continue
        if i in done:
            graded.append((i, done[i]))
            continue
        extra = {"prompt": prompts[i] if prompts is not None else _prompt(task, row), "reference": task.reference(row)}
        extra = {k: v for k, v in extra.items() if v is not None}
        records = []
        for j, c in enumerate(samples):
            rec = {"index": i, "sample": j, "task_id": row.get("task_id"), "completion": c, **extra}
            fields = dict(task.grade_sample(row, c, timeout=timeout, memory_mb=memory_mb))
            ok = bool(fields.pop("correct"))
            records.append({**rec, **fields, "correct": ok})
        if progress:
            progress.record(i, records)
        graded.append((i, records))
    graded = sorted((x for part in world.gather(graded) for x in part), key=lambda x: x[0])
    per_problem = [[r["correct"] for r in records] for _, records in graded]
    records = [r for _, rs in graded for r in rs]
    summary = {"problems": len(per_problem), **task.summarize(per_problem, ks), **task.summarize_records(records),
               **task.grading_info()}
    return summary, records


def run_task(task: str | Task, model, tok, rows: list[dict], dec: Decoding, ks=(1, 10), timeout: float = 10.0,
             memory_mb: int = 1024, world: World = World(),
             progress: Progress | None = None) -> tuple[dict, list[dict]]:
    """Score a model on a task the way the task says (``Task.scoring``): generate and grade, compare the
    options' log-likelihoods, or measure perplexity.

    Args:
        task: a registered task's name, or a (configured) task object.
        model: the model, in eval mode.
        tok: its tokenizer.
        rows: the problems (:func:`task_rows`).
        dec: decoding settings of generated answers.
        ks: pass@k values (code tasks).
        timeout: seconds per generated program (code tasks).
        memory_mb: address-space limit per generated program (code tasks).
        world: several processes (torchrun): the problems are shared out and every process returns the
            whole result, the same as one process's.
        progress: generated tasks: where the completions and the graded problems are kept, so a rerun of a
            killed evaluation neither generates nor grades again what it finished (``OUT.partial``).

    Returns:
        (summary, per-sample records), as written by :func:`write_results`.
    """
    task = _task(task)
    if task.scoring == PERPLEXITY:
        return perplexity(model, tok, rows, world=world)
    if task.scoring == OPTION_LOGLIK:
        summary, records = mc_loglik(model, tok, rows, world=world)
        return {**summary, **task.grading_info()}, records
    if task.scoring != GENERATE:
        raise ValueError(f"task {task.name}: unknown scoring {task.scoring!r}")
    rows = task.prepare(rows, tok, lambda prompts: _first_turns(model, tok, prompts, dec, world, progress))
    prompts = [task.prompt(r, tok) for r in rows]
    completions = progress.completions() if progress else None
    if completions is None:
        completions = generate_all(model, tok, prompts, dec, world=world)
        if progress:
            progress.save_completions(completions)
    return grade(task, rows, completions, ks, timeout, memory_mb, world=world, prompts=prompts, progress=progress)


def _first_turns(model, tok, prompts: list[str], dec: Decoding, world: World, progress: Progress | None) -> list[str]:
    """One completion per prompt for :meth:`Task.prepare` (a reply the graded prompt is built on), kept in
    ``OUT.partial`` so a resumed evaluation builds the same prompts without generating them again."""
    saved = progress.load("first-turns.json") if progress else None
    if saved is None or len(saved) != len(prompts):
        saved = [c[0] for c in generate_all(model, tok, prompts, replace(dec, n=1), world=world)]
        if progress:
            progress.save("first-turns.json", saved)
    return saved


@torch.no_grad()
def option_loglik(model, tok, context: str, option: str) -> float:
    """Sum of log-probabilities of ``option``'s tokens after ``context``."""
    ctx, opt = tok.encode(context), tok.encode(option, add_special_tokens=False)
    ids = torch.tensor([ctx + opt], device=model.device)
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return float(logp[len(ctx) - 1:].gather(-1, targets[len(ctx) - 1:, None]).sum())


def mc_loglik(model, tok, rows: list[dict], world: World = World()) -> tuple[dict, list[dict]]:
    """Pick the option with the highest log-likelihood (``accuracy``) and with the highest log-likelihood
    per byte of the option (``accuracy_norm``, lm-eval's acc_norm: long options are not penalised).
    Several processes (``world``): each scores rows i with i % N == rank; all get every record. A record
    carries the prompt the options were scored after and the correct option (``reference``)."""
    records = []
    for i, row in enumerate(rows):
        if i % world.size != world.rank:
            continue
        context = prompt_text(tok, row["question"])
        options = [" " + str(c) for c in row["choices"]]
        scores = [option_loglik(model, tok, context, o) for o in options]
        normed = [s / max(1, len(o.encode())) for s, o in zip(scores, options, strict=True)]
        pick = max(range(len(scores)), key=scores.__getitem__)
        pick_norm = max(range(len(normed)), key=normed.__getitem__)
        want = row["answer"] if isinstance(row["answer"], int) else "ABCDEFGHIJ".index(row["answer"])
        records.append({"index": i, "scores": scores, "choice": pick, "correct": pick == want,
                        "choice_norm": pick_norm, "correct_norm": pick_norm == want, "prompt": context,
                        "reference": f"{'ABCDEFGHIJ'[want]}. {row['choices'][want]}"})
    records = sorted((r for part in world.gather(records) for r in part), key=lambda r: r["index"])
    correct, correct_norm = sum(r["correct"] for r in records), sum(r["correct_norm"] for r in records)
    return {"problems": len(rows), "accuracy": correct / len(rows), "accuracy_norm": correct_norm / len(rows)}, records


@torch.no_grad()
def perplexity(model, tok, rows: list[dict], max_len: int = 1024,
               world: World = World()) -> tuple[dict, list[dict]]:
    """Token-level perplexity over the documents, in windows of at most ``max_len`` predicted tokens
    (capped so a window fits the model's ``max_position_embeddings``). Several processes (``world``): each
    scores documents i with i % N == rank; the sums run in document order, as in one process."""
    max_len = max(1, min(max_len, model.config.max_position_embeddings - 1))
    scored = []  # (document, [(window nll, window tokens)], its tokens)
    for i, row in enumerate(rows):
        if i % world.size != world.rank:
            continue
        text = row.get("text") or (str(row.get("prompt", "")) + str(row.get("response", "")))
        ids = tok.encode(text)
        windows = []
        for start in range(0, max(1, len(ids) - 1), max_len):
            chunk = torch.tensor([ids[start:start + max_len + 1]], device=model.device)
            if chunk.shape[1] < 2:
                continue
            out = model(chunk, labels=chunk)
            n = chunk.shape[1] - 1
            windows.append((float(out.loss) * n, n))
        scored.append((i, windows, len(ids)))
    nll, count, records = 0.0, 0, []
    for i, windows, tokens in sorted((x for part in world.gather(scored) for x in part), key=lambda x: x[0]):
        for window_nll, n in windows:
            nll += window_nll
            count += n
        records.append({"index": i, "tokens": tokens})
    return {"documents": len(rows), "tokens": count, "perplexity": math.exp(nll / max(count, 1))}, records


def write_results(out: Path, summary: dict, records: list[dict], decoding: Decoding | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {**summary, **({"decoding": asdict(decoding)} if decoding else {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with (out / "samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
