"""Task runners behind ``eval.py``: generate (batched, KV cache) or score log-likelihoods, then grade.

Tasks and metrics (the papers'):
    gsm8k       exact match of the final number (``question``/``answer`` rows)
    math        exact match of the normalised ``\\boxed{}`` answer (``problem``/``solution`` rows)
    mc          multiple choice (``question``, ``choices``, ``answer`` index or letter), by option
                log-likelihood (``--mc-mode loglik``) or by generated letter (``letter``)
    humaneval   pass@k (``task_id``, ``prompt``, ``test``, ``entry_point``), programs run in a sandbox
    mbpp        pass@k (``task_id``, ``text``, ``test_list``[, ``test_setup_code``])
    perplexity  exp(mean token NLL) over a JSONL (``text`` or prompt/response) or plain-text file
    tiny-arith  GSM8K exact match on the built-in test split
Every run records its decoding settings; per-sample records go to ``samples.jsonl``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import prompt_text, tiny_arith_split
from .sandbox import humaneval_program, mbpp_program, run_program
from .scoring import extract_choice, gsm8k_correct, math_correct, pass_at_k

TASKS = ("gsm8k", "math", "mc", "humaneval", "mbpp", "perplexity", "tiny-arith")
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")


@dataclass
class Decoding:
    max_new_tokens: int = 256
    n: int = 1  # samples per problem (pass@k needs n >= k)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0


def read_rows(path: str | Path) -> list[dict]:
    rows = []
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def task_rows(task: str, data: str | None, limit: int | None) -> list[dict]:
    """The problems of a task: the built-in split for tiny-arith, else ``--data``."""
    if task == "tiny-arith":
        rows = [{"question": q, "answer": a} for q, a in tiny_arith_split("test")]
    elif data is None:
        raise ValueError(f"task {task} needs --data FILE (no benchmark data is downloaded)")
    elif task == "perplexity" and not str(data).endswith(".jsonl"):
        rows = [{"text": Path(data).read_text(encoding="utf-8")}]
    else:
        rows = read_rows(data)
    return rows[:limit] if limit else rows


def task_prompt(task: str, row: dict, tok) -> str:
    if task in ("gsm8k", "tiny-arith"):
        return prompt_text(tok, row["question"])
    if task == "math":
        return prompt_text(tok, row["problem"])
    if task == "humaneval":
        return row["prompt"]
    if task == "mbpp":
        tests = "\n".join(row.get("test_list", []))
        return prompt_text(tok, f"{row['text']}\nYour code should pass these tests:\n{tests}")
    if task == "mc":
        letters = "ABCDEFGHIJ"
        options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(row["choices"]))
        return prompt_text(tok, f"{row['question']}\n{options}\nAnswer with the letter of the correct option.")
    raise ValueError(task)


@torch.no_grad()
def generate_all(model, tok, prompts: list[str], dec: Decoding, progress: bool = True) -> list[list[str]]:
    """``dec.n`` completions per prompt, batched with left padding and a KV cache."""
    from tqdm.auto import tqdm

    device = model.device
    g = torch.Generator(device=device).manual_seed(dec.seed)
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(dec.n)]
    out: list[list[str]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(jobs), dec.batch_size), disable=not progress, desc="generate"):
        chunk = jobs[start:start + dec.batch_size]
        batch = tok.batch([p for _, p in chunk], padding_side="left")
        ids = batch["input_ids"].to(device)
        new = model.generate(ids, attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=dec.max_new_tokens, do_sample=dec.temperature > 0,
                             temperature=dec.temperature or 1.0, top_p=dec.top_p, eos_token_id=tok.eos_token_ids,
                             pad_token_id=tok.pad_token_id, generator=g)
        for (i, _), row in zip(chunk, new[:, ids.shape[1]:].tolist()):
            row = [t for t in row if t not in tok.eos_token_ids and t != tok.pad_token_id]
            out[i].append(tok.decode(row))
    return out


def clean_code(task: str, completion: str) -> str:
    """The program text of a completion: a fenced block's content when there is one (any info string:
    ```python, ```py, ```Python, ```), else for HumanEval the text up to the first stop sequence."""
    block = re.search(r"```[^\n]*\n(.*?)(?:```|$)", completion, re.S)
    if block:
        return block.group(1)
    if task == "mbpp":
        return completion
    cut = min([completion.find(s) for s in CODE_STOPS if s in completion] or [len(completion)])
    return completion[:cut]


def grade(task: str, rows: list[dict], completions: list[list[str]], ks=(1, 10), timeout: float = 10.0,
          memory_mb: int = 1024) -> tuple[dict, list[dict]]:
    """Score completions (``completions[i]`` are problem i's samples). Returns (summary, per-sample records)."""
    records, per_problem = [], []
    for row, samples in zip(rows, completions):
        correct = []
        for j, c in enumerate(samples):
            rec = {"index": len(per_problem), "sample": j, "task_id": row.get("task_id"), "completion": c}
            if task in ("gsm8k", "tiny-arith"):
                ok = gsm8k_correct(c, str(row["answer"]))
            elif task == "math":
                ok = math_correct(c, row.get("answer") or row["solution"])
            elif task == "mc":
                want = row["answer"] if isinstance(row["answer"], str) else "ABCDEFGHIJ"[row["answer"]]
                ok = extract_choice(c, "ABCDEFGHIJ"[:len(row["choices"])]) == want
            else:
                code = clean_code(task, c)
                program = humaneval_program(row, code) if task == "humaneval" else mbpp_program(row, code)
                result = run_program(program, timeout, memory_mb)
                ok = result.passed
                rec.update(status=result.status, detail=result.detail[-300:])
            rec["correct"] = bool(ok)
            correct.append(bool(ok))
            records.append(rec)
        per_problem.append(correct)
    if task in ("humaneval", "mbpp"):
        n = min(len(c) for c in per_problem)
        scores = {f"pass@{k}": sum(pass_at_k(len(c), sum(c), k) for c in per_problem) / len(per_problem)
                  for k in ks if k <= n}
        if not scores:
            raise ValueError(f"pass@k needs n >= k samples per problem; got n={n}, k={list(ks)}")
    else:
        # with n > 1 samples per problem: the mean over all samples (greedy n = 1 is the papers' setting)
        scores = {"exact_match": sum(sum(c) / len(c) for c in per_problem) / len(per_problem)}
    return {"problems": len(per_problem), **scores}, records


@torch.no_grad()
def option_loglik(model, tok, context: str, option: str) -> float:
    """Sum of log-probabilities of ``option``'s tokens after ``context``."""
    ctx, opt = tok.encode(context), tok.encode(option, add_special_tokens=False)
    ids = torch.tensor([ctx + opt], device=model.device)
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return float(logp[len(ctx) - 1:].gather(-1, targets[len(ctx) - 1:, None]).sum())


def mc_loglik(model, tok, rows: list[dict]) -> tuple[dict, list[dict]]:
    """Pick the option with the highest log-likelihood (``accuracy``) and with the highest log-likelihood
    per byte of the option (``accuracy_norm``, lm-eval's acc_norm: long options are not penalised)."""
    records, correct, correct_norm = [], 0, 0
    for i, row in enumerate(rows):
        context = prompt_text(tok, row["question"])
        options = [" " + str(c) for c in row["choices"]]
        scores = [option_loglik(model, tok, context, o) for o in options]
        normed = [s / max(1, len(o.encode())) for s, o in zip(scores, options, strict=True)]
        pick = max(range(len(scores)), key=scores.__getitem__)
        pick_norm = max(range(len(normed)), key=normed.__getitem__)
        want = row["answer"] if isinstance(row["answer"], int) else "ABCDEFGHIJ".index(row["answer"])
        correct += pick == want
        correct_norm += pick_norm == want
        records.append({"index": i, "scores": scores, "choice": pick, "correct": pick == want,
                        "choice_norm": pick_norm, "correct_norm": pick_norm == want})
    return {"problems": len(rows), "accuracy": correct / len(rows), "accuracy_norm": correct_norm / len(rows)}, records


@torch.no_grad()
def perplexity(model, tok, rows: list[dict], max_len: int = 1024) -> tuple[dict, list[dict]]:
    """Token-level perplexity over the documents, in windows of at most ``max_len`` predicted tokens
    (capped so a window fits the model's ``max_position_embeddings``)."""
    max_len = max(1, min(max_len, model.config.max_position_embeddings - 1))
    nll, count, records = 0.0, 0, []
    for i, row in enumerate(rows):
        text = row.get("text") or (str(row.get("prompt", "")) + str(row.get("response", "")))
        ids = tok.encode(text)
        for start in range(0, max(1, len(ids) - 1), max_len):
            chunk = torch.tensor([ids[start:start + max_len + 1]], device=model.device)
            if chunk.shape[1] < 2:
                continue
            out = model(chunk, labels=chunk)
            n = chunk.shape[1] - 1
            nll += float(out.loss) * n
            count += n
        records.append({"index": i, "tokens": len(ids)})
    return {"documents": len(rows), "tokens": count, "perplexity": math.exp(nll / max(count, 1))}, records


def write_results(out: Path, summary: dict, records: list[dict], decoding: Decoding | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {**summary, **({"decoding": asdict(decoding)} if decoding else {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with (out / "samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
