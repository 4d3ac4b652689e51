"""eval.py: scoring completions from elsewhere, a train.py run followed by eval.py, and the task split."""

import json
import sys
from pathlib import Path

import pytest
import torch

import minimoe

from minimoe.train.data import tiny_arith_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as evaluate  # noqa: E402
import train  # noqa: E402

HUMANEVAL = [
    {"task_id": "T/0", "entry_point": "add", "prompt": "def add(a, b):\n",
     "test": "def check(f):\n    assert f(2, 3) == 5\n"},
    {"task_id": "T/1", "entry_point": "neg", "prompt": "def neg(a):\n",
     "test": "def check(f):\n    assert f(2) == -2\n"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_completions_from_another_tool_are_scored_without_a_model(tmp_path, capsys):
    data = _jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    samples = _jsonl(tmp_path / "samples.jsonl", [
        {"task_id": "T/0", "completion": "    return a + b\n"}, {"task_id": "T/0", "completion": "    return a\n"},
        {"task_id": "T/1", "completion": "    while True:\n        pass\n"},
        {"task_id": "T/1", "completion": "    return -a\n\ndef unrelated():\n    pass\n"}])
    assert evaluate.main(["--task", "humaneval", "--data", str(data), "--completions", str(samples), "--k", "1", "2",
                          "--timeout", "2", "--out", str(tmp_path / "he")]) == 0
    summary = json.loads((tmp_path / "he/summary.json").read_text())
    assert summary["pass@1"] == pytest.approx(0.5) and summary["pass@2"] == pytest.approx(1.0)
    records = [json.loads(line) for line in (tmp_path / "he/samples.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["passed", "failed", "timeout", "passed"]
    gsm = _jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"},
                                          {"question": "2+2?", "answer": "#### 4"}])
    comp = _jsonl(tmp_path / "gc.jsonl", [{"index": 0, "completion": "It is 2.\n#### 2"},
                                          {"index": 1, "completion": "#### 5"}])
    assert evaluate.main(["--task", "gsm8k", "--data", str(gsm), "--completions", str(comp),
                          "--out", str(tmp_path / "g")]) == 0
    assert json.loads((tmp_path / "g/summary.json").read_text())["exact_match"] == 0.5
    # eval.py's own samples.jsonl (task_id null, index set) scores again the same
    assert evaluate.main(["--task", "gsm8k", "--data", str(gsm), "--completions", str(tmp_path / "g/samples.jsonl"),
                          "--out", str(tmp_path / "g2")]) == 0
    assert json.loads((tmp_path / "g2/summary.json").read_text())["exact_match"] == 0.5
    assert evaluate.main(["--task", "gsm8k", "--data", str(gsm), "--completions", str(comp),
                          "--out", str(tmp_path / "g")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_train_then_eval_produces_files_and_a_score(tmp_path):
    run = tmp_path / "run"
    assert train.main(["--policy", "epng", "--model", "tiny-olmoe", "--steps", "6", "--batch-size", "4",
                       "--eval-limit", "0", "--epng-warmup", "2",
                       "--epng-interval", "2", "--out", str(run)]) == 0
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(run / "base"), "--adapter", str(run / "adapter"), "--task", "tiny-arith",
                          "--limit", "6", "--max-new-tokens", "8", "--batch-size", "4", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 6 and 0.0 <= summary["exact_match"] <= 1.0
    assert summary["decoding"]["max_new_tokens"] == 8 and summary["adapter"] == str(run / "adapter")
    assert len((out / "samples.jsonl").read_text().splitlines()) == 6
    # batching must not change greedy completions (left padding, positions from the mask)
    one = tmp_path / "eval1"
    assert evaluate.main(["--model", str(run / "base"), "--adapter", str(run / "adapter"), "--task", "tiny-arith",
                          "--limit", "6", "--max-new-tokens", "8", "--batch-size", "1", "--out", str(one)]) == 0
    a = [json.loads(line)["completion"] for line in (out / "samples.jsonl").read_text().splitlines()]
    b = [json.loads(line)["completion"] for line in (one / "samples.jsonl").read_text().splitlines()]
    assert a == b
    ppl = tmp_path / "ppl"
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "Ana has 3 apples."}, {"prompt": "2+2=", "response": "4"}])
    assert evaluate.main(["--model", str(run / "base"), "--task", "perplexity", "--data", str(text),
                          "--out", str(ppl)]) == 0
    assert json.loads((ppl / "summary.json").read_text())["perplexity"] > 1
    mc = _jsonl(tmp_path / "mc.jsonl", [{"question": "Sky?", "choices": ["blue", "green"], "answer": 0},
                                        {"question": "Grass?", "choices": ["blue", "green"], "answer": "B"}])
    for mode in ("loglik", "letter"):
        assert evaluate.main(["--model", str(run / "base"), "--task", "mc", "--data", str(mc), "--mc-mode", mode,
                              "--max-new-tokens", "3", "--out", str(tmp_path / f"mc-{mode}")]) == 0
    rows = [{"choices": ["blue", "green"], "answer": 0}, {"choices": ["blue", "green"], "answer": 1}]
    recs = [json.loads(line) for line in (tmp_path / "mc-loglik/samples.jsonl").read_text().splitlines()]
    for row, rec in zip(rows, recs, strict=True):
        norm = [s / len((" " + c).encode()) for s, c in zip(rec["scores"], row["choices"], strict=True)]
        assert rec["choice"] == max(range(2), key=rec["scores"].__getitem__)
        assert rec["choice_norm"] == max(range(2), key=norm.__getitem__)
    got = json.loads((tmp_path / "mc-loglik/summary.json").read_text())
    assert got["accuracy_norm"] == sum(r["choice_norm"] == w["answer"] for r, w in zip(recs, rows, strict=True)) / 2


def test_tiny_arith_split_is_deterministic_and_disjoint():
    train_a, test_a = tiny_arith_split("train", 0), tiny_arith_split("test", 0)
    assert train_a == tiny_arith_split("train", 0) and test_a == tiny_arith_split("test", 0)
    assert len(train_a) == 512 and len(test_a) == 200
    assert not {q for q, _ in train_a} & {q for q, _ in test_a}
    assert tiny_arith_split("train", 1) != train_a
    assert all(a.rsplit("#### ", 1)[1].lstrip("-").isdigit() for _, a in test_a)


def test_missing_data_is_named(tmp_path, capsys):
    assert evaluate.main(["--model", "x", "--task", "gsm8k", "--out", str(tmp_path / "o")]) == 2
    assert "task gsm8k needs --data FILE" in capsys.readouterr().err
    assert evaluate.main(["--task", "gsm8k", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_short_run_on_the_embedded_default_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--policy", "epng", "--steps", "4", "--eval-limit", "4", "--epng-warmup", "2",
                       "--epng-interval", "2", "--out", str(run)]) == 0
    said = capsys.readouterr().out
    assert "weights/tiny-moe" in said and "tiny-arith test exact match: " in said  # defaults: the shipped model
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"].endswith("weights/tiny-moe") and summary["events"] >= 2
    assert 0 <= summary["task_score_before"] <= 1 and 0 <= summary["task_score_after"] <= 1
    assert json.loads((run / "args.json").read_text())["lr"] == 3e-3  # the embedded run's scaled default
    out = tmp_path / "eval"
    # no --model: the base is the one the adapter records (the shipped model)
    assert evaluate.main(["--adapter", str(run / "adapter"), "--task", "tiny-arith", "--limit", "4",
                          "--max-new-tokens", "32", "--out", str(out)]) == 0
    scored = json.loads((out / "summary.json").read_text())
    assert scored["problems"] == 4 and scored["model"] == summary["model"]


def test_code_is_taken_from_fenced_blocks_of_any_tag():
    from minimoe.eval.runners import clean_code

    code = "def f():\n    return 1\n"
    for tag in ("python", "py", "Python", ""):
        assert clean_code("mbpp", f"Here:\n```{tag}\n{code}```\nExplanation") == code
        assert clean_code("humaneval", f"```{tag}\n{code}```") == code
    assert clean_code("humaneval", "    return 1\n\ndef helper():\n    pass\n") == "    return 1\n"
    assert clean_code("mbpp", code) == code


def test_perplexity_windows_fit_the_model_context():
    from minimoe.eval.runners import perplexity
    from minimoe.model.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = minimoe.CausalLM(minimoe.preset("tiny-qwen3", vocab_size=272, max_position_embeddings=16)).eval()
    rows = [{"text": "a fairly long document of more than sixteen bytes"}]
    summary, _ = perplexity(model, tok, rows)  # not 1,024-token windows: longer than the model's context
    assert summary["tokens"] == len(tok.encode(rows[0]["text"])) - 1
    assert summary["perplexity"] == perplexity(model, tok, rows, max_len=15)[0]["perplexity"]


def test_default_out_is_per_thing_evaluated_and_checked_before_evaluating(tmp_path, capsys, monkeypatch):
    args = evaluate.build_parser().parse_args
    run = tmp_path / "myrun"
    (run / "adapter").mkdir(parents=True)
    assert evaluate.default_out(args(["--adapter", str(run / "adapter"), "--task", "tiny-arith"])) == \
        Path("runs/eval/myrun/tiny-arith")
    assert evaluate.default_out(args(["--model", str(tmp_path), "--task", "gsm8k"])) == \
        Path(f"runs/eval/{tmp_path.name}/gsm8k")
    assert evaluate.default_out(args(["--model", "allenai/OLMoE-1B-7B-0125", "--task", "math"])) == \
        Path("runs/eval/allenai--OLMoE-1B-7B-0125/math")
    # an existing destination is refused before the model is even loaded
    monkeypatch.chdir(tmp_path)
    Path("runs/eval/myrun/tiny-arith").mkdir(parents=True)
    monkeypatch.setattr(evaluate, "run_model", lambda *a: pytest.fail("evaluated into an existing directory"))
    assert evaluate.main(["--adapter", str(run / "adapter"), "--task", "tiny-arith"]) == 2
    assert "runs/eval/myrun/tiny-arith already exists; pass --overwrite" in capsys.readouterr().err


@pytest.fixture
def reverse_task():
    """A toy benchmark, registered for one test: adding a task is a subclass and one register() call."""
    from minimoe.eval.tasks import TASKS, Task, register

    class Reverse(Task):
        def prompt(self, row, tok):
            return f"Reverse: {row['text']}"

        def correct(self, row, completion):
            return completion.strip() == row["text"][::-1]

    task = register(Reverse("reverse", "reverse a string (text rows), exact match"))
    try:
        yield task
    finally:
        del TASKS["reverse"]


def test_a_registered_task_is_scored_by_eval_py(tmp_path, reverse_task, capsys):
    from minimoe.eval.runners import TASKS, task_prompt
    from minimoe.eval.tasks import register

    assert "reverse" in TASKS and task_prompt("reverse", {"text": "ab"}, None) == "Reverse: ab"
    assert "reverse a string" in evaluate.build_parser().format_help()
    with pytest.raises(ValueError, match="already registered"):
        register(reverse_task)
    data = _jsonl(tmp_path / "rev.jsonl", [{"text": "abc"}, {"text": "moe"}])
    comp = _jsonl(tmp_path / "c.jsonl", [{"index": 0, "completion": "cba\n"}, {"index": 1, "completion": "moe"}])
    assert evaluate.main(["--task", "reverse", "--data", str(data), "--completions", str(comp),
                          "--out", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r/summary.json").read_text())
    assert summary == {"problems": 2, "exact_match": 0.5, "task": "reverse", "completions": str(comp)}
    records = [json.loads(line) for line in (tmp_path / "r/samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["completion"], r["correct"]) for r in records] == [(0, "cba\n", True), (1, "moe", False)]
    # tasks scored by log-likelihood say so; multiple choice in letter mode grades completions
    mc = _jsonl(tmp_path / "mc.jsonl", [{"question": "Sky?", "choices": ["blue", "green"], "answer": 0}])
    letters = _jsonl(tmp_path / "l.jsonl", [{"index": 0, "completion": "The answer is (A)."}])
    assert evaluate.main(["--task", "mc", "--data", str(mc), "--completions", str(letters),
                          "--out", str(tmp_path / "m")]) == 2
    assert "use --mc-mode letter" in capsys.readouterr().err
    assert evaluate.main(["--task", "mc", "--data", str(mc), "--completions", str(letters), "--mc-mode", "letter",
                          "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m/summary.json").read_text())["exact_match"] == 1.0
    assert evaluate.main(["--task", "perplexity", "--data", str(mc), "--completions", str(letters),
                          "--out", str(tmp_path / "p")]) == 2
    assert "cannot score perplexity" in capsys.readouterr().err


def test_the_registry_holds_the_builtin_tasks_in_order():
    """What eval.py offers; also checks that a test's toy task was taken out again."""
    from minimoe.eval import runners as evaluation
    from minimoe.eval import tasks

    names = ("gsm8k", "math", "mc", "humaneval", "mbpp", "perplexity", "tiny-arith")
    assert evaluation.TASKS == names and tuple(tasks.TASKS) == names
    assert all(tasks.TASKS[n].name == n and tasks.TASKS[n].description for n in names)
    scoring = {n: t.scoring for n, t in tasks.TASKS.items()}
    assert scoring == dict.fromkeys(names, tasks.GENERATE) | {"mc": tasks.OPTION_LOGLIK,
                                                              "perplexity": tasks.PERPLEXITY}
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        evaluation.task_rows("nope", None, None)
