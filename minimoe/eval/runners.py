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
from ..model.generate import KVCache
from ..parallel.distributed import World
from .progress import Progress
from .tasks import CODE_STOPS, GENERATE, OPTION_LOGLIK, PERPLEXITY, Task, get_task, read_rows
from .tasks import TASKS as _REGISTRY

__all__ = ["CODE_STOPS", "Decoding", "clean_code", "generate_all", "grade", "mc_loglik", "option_loglik",
           "options_loglik", "perplexity", "read_rows", "run_task", "task_prompt", "task_rows", "write_results"]


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


def _batches(lengths: list[int], size: int) -> list[list[int]]:
    """The indices ``0..len(lengths)-1`` cut into batches of ``size`` after sorting them by length, longest
    first (ties in index order): a batch holds items of about one length, so it pads little, and the longest
    batch runs first, so one that does not fit in memory fails at once. The order depends only on the
    lengths, so every process cuts the same batches (a process's share is a set of whole batches)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + size] for start in range(0, len(order), max(1, size))]


@torch.no_grad()
def generate_all(model, tok, prompts: list[str], dec: Decoding, progress: bool = True,
                 world: World = World()) -> list[list[str]]:
    """``dec.n`` completions per prompt, batched with left padding and a KV cache.

    The jobs (prompt, sample) are sorted by the prompt's length in tokens (longest first) and cut into
    batches of ``dec.batch_size``, so a batch pads little (:func:`_batches`); the completions come back in the
    prompts' order. Batch b samples from its own generator (seed ``dec.seed``, b), so a completion depends
    only on its batch: with several processes (``world``), process r generates batches r, r + N, ... and every
    process gets all completions back, exactly those one process would generate."""
    from tqdm.auto import tqdm

    device = model.device
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(dec.n)]
    lengths = [len(tok.encode(p)) for p in prompts]
    batches = _batches([lengths[i] for i, _ in jobs], dec.batch_size)
    mine: list[tuple[int, str]] = []  # (job, completion)
    for b in tqdm(range(len(batches)), disable=not progress or not world.main, desc="generate"):
        if b % world.size != world.rank:
            continue
        chunk = batches[b]
        g = torch.Generator(device=device).manual_seed(dec.seed * 1_000_003 + b)
        batch = tok.batch([jobs[job][1] for job in chunk], padding_side="left")
        ids = batch["input_ids"].to(device)
        new = model.generate(ids, attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=dec.max_new_tokens, do_sample=dec.temperature > 0,
                             temperature=dec.temperature or 1.0, top_p=dec.top_p, eos_token_id=tok.eos_token_ids,
                             pad_token_id=tok.pad_token_id, generator=g)
        for job, row in zip(chunk, new[:, ids.shape[1]:].tolist()):
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
        summary, records = mc_loglik(model, tok, rows, world=world, batch_size=dec.batch_size)
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
    """Sum of log-probabilities of ``option``'s tokens after ``context``, one forward for the one option: the
    reference :func:`options_loglik` is held to (tests), and what ``minimoe eval`` computed before batching."""
    ctx, opt = tok.encode(context), tok.encode(option, add_special_tokens=False)
    ids = torch.tensor([ctx + opt], device=model.device)
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return float(logp[len(ctx) - 1:].gather(-1, targets[len(ctx) - 1:, None]).sum())


@torch.no_grad()
def options_loglik(model, tok, questions: list[tuple[str, list[str]]]) -> list[list[float]]:
    """Per question ``(context, options)``, the sum of log-probabilities of each option's tokens after the
    context: :func:`option_loglik` of every option, in two forwards for all of them.

    The tokens are those of :func:`option_loglik` (the context encoded with the special tokens, each option on
    its own), so only the padding and the batching differ: the sums agree within float rounding (fp32: a few
    1e-7 of the sum measured; tests hold them to 1e-5 absolute plus 1e-6 relative). A question's options all continue
    the same context, which is much longer than an option (an ARC question is tens of tokens, an option a few),
    so the context is run once: the contexts, left-padded, go through the model into a KV cache, whose last
    position predicts every option's first token; the cache's rows are repeated for each question's options,
    which then run together, right-padded after their context (positions come from the attention mask, so
    both paddings give every real token the position it has alone). That is a context's tokens once instead
    of once per option, and the vocabulary projection only where an option token is predicted.

    Shape legend: Q questions, N options of all questions, C context width (left-padded), O option width
    (right-padded), V vocabulary.
    """
    device, config = model.device, model.config
    if not questions:
        return []
    ctx = tok.batch([context for context, _ in questions], padding_side="left")  # (Q, C)
    if ctx["attention_mask"].sum(-1).min() == 0:
        raise ValueError("a multiple-choice context of no tokens: there is nothing to predict its options from")
    opt = tok.batch([o for _, options in questions for o in options], padding_side="right",
                    add_special_tokens=False)  # (N, O)
    owner = torch.tensor([q for q, (_, options) in enumerate(questions) for _ in options], device=device)  # (N,)
    ctx_ids, ctx_mask = ctx["input_ids"].to(device), ctx["attention_mask"].to(device)
    opt_ids, opt_mask = opt["input_ids"].to(device), opt["attention_mask"].to(device).bool()
    (Q, C), (N, O) = ctx_ids.shape, opt_ids.shape
    cache = KVCache(config, Q, C, model.dtype, device)
    first = model(ctx_ids, attention_mask=ctx_mask, kv_cache=cache, logits_to_keep=1).logits[:, -1]  # (Q, V)
    logits = first[owner, None]  # (N, 1, V): predicts option token 0
    if O > 1:  # the options but their last token (which predicts nothing), after their own context's cache
        rows = KVCache(config, N, C + O - 1, model.dtype, device)
        for layer in range(config.num_hidden_layers):
            rows.k[layer][:, :, :C] = cache.k[layer][owner]
            rows.v[layer][:, :, :C] = cache.v[layer][owner]
        rows.length = C
        mask = torch.cat([ctx_mask[owner], opt_mask[:, :-1].long()], -1)  # (N, C + O - 1)
        later = model(opt_ids[:, :-1], attention_mask=mask, kv_cache=rows).logits  # (N, O - 1, V): tokens 1..O-1
        logits = torch.cat([logits, later], 1)  # (N, O, V): logits[n, j] predicts option n's token j
    logp = torch.log_softmax(logits.float(), -1).gather(-1, opt_ids[..., None])[..., 0]  # (N, O)
    sums = torch.where(opt_mask, logp, 0.0).sum(-1).tolist()  # (N,)
    out, start = [], 0
    for _, options in questions:
        out.append(sums[start:start + len(options)])
        start += len(options)
    return out


def mc_loglik(model, tok, rows: list[dict], world: World = World(), batch_size: int = 8) -> tuple[dict, list[dict]]:
    """Pick the option with the highest log-likelihood (``accuracy``) and with the highest log-likelihood
    per byte of the option (``accuracy_norm``, lm-eval's acc_norm: long options are not penalised).
    A record carries the prompt the options were scored after and the correct option (``reference``).

    The questions are scored ``batch_size`` at a time, all options of a batch's questions together
    (:func:`options_loglik`), in batches of about one context length (:func:`_batches`). Several processes
    (``world``): process r scores batches r, r + N, ... (whole batches, as :func:`generate_all` shares them),
    so a question is scored in the batch it has in one process and every process gets the one-process
    records, bit for bit where the arithmetic is (the same device and thread count)."""
    contexts = [prompt_text(tok, row["question"]) for row in rows]
    batches = _batches([len(tok.encode(c)) for c in contexts], batch_size)
    records = []
    for b, batch in enumerate(batches):
        if b % world.size != world.rank:
            continue
        options = {i: [" " + str(c) for c in rows[i]["choices"]] for i in batch}
        for i, scores in zip(batch, options_loglik(model, tok, [(contexts[i], options[i]) for i in batch])):
            row = rows[i]
            normed = [s / max(1, len(o.encode())) for s, o in zip(scores, options[i], strict=True)]
            pick = max(range(len(scores)), key=scores.__getitem__)
            pick_norm = max(range(len(normed)), key=normed.__getitem__)
            want = row["answer"] if isinstance(row["answer"], int) else "ABCDEFGHIJ".index(row["answer"])
            records.append({"index": i, "scores": scores, "choice": pick, "correct": pick == want,
                            "choice_norm": pick_norm, "correct_norm": pick_norm == want, "prompt": contexts[i],
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
