"""eval.py: scoring completions from elsewhere, a train.py run followed by eval.py, and the task split."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minimoe

from minimoe.data.builtin import tiny_arith_split

from minimoe.cli import eval as evaluate  # noqa: E402
from minimoe.cli import train as train  # noqa: E402

HUMANEVAL = [
    {"task_id": "T/0", "entry_point": "add", "prompt": "def add(a, b):\n",
     "test": "def check(f):\n    assert f(2, 3) == 5\n"},
    {"task_id": "T/1", "entry_point": "neg", "prompt": "def neg(a):\n",
     "test": "def check(f):\n    assert f(2) == -2\n"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
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
    assert "model tiny-moe (olmoe" in said and "tiny-arith test exact match: " in said  # defaults: the shipped model
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "tiny-moe" and summary["events"] >= 2
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

    names = ("gsm8k", "math", "mc", "humaneval", "mbpp", "perplexity", "tiny-arith", "tiny-mix", "prefeval")
    assert evaluation.TASKS == names and tuple(tasks.TASKS) == names
    assert all(tasks.TASKS[n].name == n and tasks.TASKS[n].description for n in names)
    scoring = {n: t.scoring for n, t in tasks.TASKS.items()}
    assert scoring == dict.fromkeys(names, tasks.GENERATE) | {"mc": tasks.OPTION_LOGLIK,
                                                              "perplexity": tasks.PERPLEXITY}
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        evaluation.task_rows("nope", None, None)


# --- graded code cannot beat the grader; killed evaluations resume; unwritable outputs; full records -------

ROOT = Path(__file__).resolve().parents[1]
FOUR = [dict(p, task_id=f"T/{i}") for i, p in enumerate(HUMANEVAL * 2)]  # add, neg, add, neg


def _eval_cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "eval.py"), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "samples.jsonl").read_text().splitlines()]


@pytest.fixture
def graded_programs(monkeypatch):
    """Counts the programs this process runs (those an evaluation grades rather than reads back)."""
    from minimoe.eval import tasks

    ran = []
    real = tasks.run_program

    def counting(*a, **kw):
        ran.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(tasks, "run_program", counting)
    return ran


@pytest.mark.slow
def test_a_completion_that_kills_its_parent_does_not_kill_eval(tmp_path):
    data = _jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    kill = "    return a + b\nimport os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    samples = _jsonl(tmp_path / "c.jsonl", [{"task_id": "T/0", "completion": kill},
                                            {"task_id": "T/1", "completion": "    return -a\n"}])
    proc = _eval_cli("--task", "humaneval", "--data", data, "--completions", samples, "--k", "1",
                     "--out", tmp_path / "out")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]  # was -9: eval.py itself was the program's parent
    assert [r["status"] for r in _records(tmp_path / "out")] == ["failed", "passed"]
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["pass@1"] == 0.5 and summary["sandbox"] == "process" and "landlock_abi" in summary


@pytest.mark.slow
def test_a_killed_evaluation_resumes_where_it_stopped(tmp_path, graded_programs, capsys):
    data = _jsonl(tmp_path / "he.jsonl", FOUR)
    slow = "    import time\n    time.sleep(3)\n    return a + b\n"  # problem 2: gives us time to kill eval.py
    samples = _jsonl(tmp_path / "c.jsonl", [
        {"task_id": "T/0", "completion": "    return a + b\n"}, {"task_id": "T/1", "completion": "    return a\n"},
        {"task_id": "T/2", "completion": slow}, {"task_id": "T/3", "completion": "    return -a\n"}])
    args = ["--task", "humaneval", "--data", data, "--completions", samples, "--k", "1"]
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    proc = _eval_cli(*args, "--out", out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
            (partial / "rank-0.jsonl").is_file() and len((partial / "rank-0.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    assert not out.exists() and len((partial / "rank-0.jsonl").read_text().splitlines()) == 2
    # the same command again: problems 0 and 1 are read back, 2 and 3 graded
    assert evaluate.main([*map(str, args), "--out", str(out)]) == 0
    assert len(graded_programs) == 2 and not partial.exists()
    assert evaluate.main([*map(str, args), "--out", str(tmp_path / "whole")]) == 0  # uninterrupted
    for name in ("summary.json", "samples.jsonl"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert [r["status"] for r in _records(out)] == ["passed", "failed", "passed", "passed"]
    # the progress of a different evaluation is not resumed: refused, or started over with --overwrite
    other = tmp_path / "other.partial"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"task": "humaneval", "timeout": 1.0}))
    capsys.readouterr()
    assert evaluate.main([*map(str, args), "--out", str(tmp_path / "other")]) == 2
    assert "other.partial holds the progress of a different evaluation" in capsys.readouterr().err
    assert evaluate.main([*map(str, args), "--out", str(tmp_path / "other"), "--overwrite"]) == 0
    assert (tmp_path / "other/samples.jsonl").read_text() == (tmp_path / "whole/samples.jsonl").read_text()



def test_a_resumed_model_evaluation_neither_generates_nor_grades_again(tmp_path, monkeypatch, graded_programs):
    from minimoe.eval import runners
    from minimoe.eval.progress import Progress

    args = ["--model", "tiny-moe", "--device", "cpu", "--task", "humaneval", "--data",
            str(_jsonl(tmp_path / "he.jsonl", HUMANEVAL)), "--max-new-tokens", "8", "--k", "1"]
    assert evaluate.main([*args, "--out", str(tmp_path / "whole")]) == 0
    record = Progress.record

    def interrupted(self, index, records):  # Ctrl-C once the first problem is on disk
        record(self, index, records)
        raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main([*args, "--out", str(tmp_path / "out")])
    monkeypatch.setattr(Progress, "record", record)
    monkeypatch.setattr(runners, "generate_all", lambda *a, **k: pytest.fail("generated again"))
    graded_programs.clear()
    assert evaluate.main([*args, "--out", str(tmp_path / "out")]) == 0
    assert len(graded_programs) == 1  # the second problem only
    for name in ("summary.json", "samples.jsonl"):
        assert (tmp_path / "out" / name).read_text() == (tmp_path / "whole" / name).read_text()

def test_an_unwritable_output_is_refused_before_anything_is_evaluated(tmp_path, capsys, monkeypatch):
    data = _jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    samples = _jsonl(tmp_path / "c.jsonl", [{"task_id": "T/0", "completion": "    return a + b\n"},
                                            {"task_id": "T/1", "completion": "    return -a\n"}])
    monkeypatch.setattr(evaluate, "grade", lambda *a, **k: pytest.fail("graded into an unwritable destination"))
    afile = tmp_path / "afile"
    afile.write_text("a regular file where a directory should be\n")
    # chmod 0o555 does not stop root: then /sys (sysfs, where even root creates no files) is the read-only one
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() == 0:
        readonly = Path("/sys")
    cases = {afile / "out": f"cannot write to {afile}: it is not a directory",
             afile / "sub" / "out": f"cannot create {afile / 'sub'}: Not a directory",
             readonly / "out": f"cannot write to {readonly}: "}
    for out, said in cases.items():
        assert evaluate.main(["--task", "humaneval", "--data", str(data), "--completions", str(samples),
                              "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: " + said) and err.count("\n") == 1, err  # one line, no traceback


def test_a_failed_final_write_keeps_the_graded_problems(tmp_path, capsys, monkeypatch, graded_programs):
    """The disk fills up after grading (here: a file-size limit makes the write really fail): one line naming
    OUT, and the rerun writes the results from OUT.partial without grading again."""
    import resource

    data = _jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    samples = _jsonl(tmp_path / "c.jsonl", [{"task_id": "T/0", "completion": "    return a + b\n"},
                                            {"task_id": "T/1", "completion": "    return a\n"}])
    args = ["--task", "humaneval", "--data", str(data), "--completions", str(samples), "--k", "1"]
    real = evaluate.write_results

    def full_disk(*a, **k):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
        try:
            real(*a, **k)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(evaluate, "write_results", full_disk)
    out = tmp_path / "out"
    assert evaluate.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {out}: File too large; the graded problems are kept in "
                          f"{tmp_path / 'out.partial'}") and err.count("\n") == 1, err
    assert not out.exists() and len(graded_programs) == 2
    monkeypatch.setattr(evaluate, "write_results", real)
    assert evaluate.main([*args, "--out", str(out)]) == 0
    assert len(graded_programs) == 2  # nothing graded again
    assert [r["status"] for r in _records(out)] == ["passed", "failed"]


def test_records_carry_the_prompt_and_the_reference(tmp_path):
    from minimoe.eval.runners import task_prompt

    he = _jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    comp = _jsonl(tmp_path / "c.jsonl", [{"task_id": "T/0", "completion": "    return a + b\n"},
                                         {"task_id": "T/1", "completion": "    return a\n"}])
    assert evaluate.main(["--task", "humaneval", "--data", str(he), "--completions", str(comp), "--k", "1",
                          "--out", str(tmp_path / "he")]) == 0
    records = _records(tmp_path / "he")
    assert [(r["prompt"], r["reference"]) for r in records] == [(p["prompt"], p["test"]) for p in HUMANEVAL]
    assert list(records[0])[:4] == ["index", "sample", "task_id", "completion"] and list(records[0])[-1] == "correct"
    gsm = _jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"}])
    assert evaluate.main(["--task", "gsm8k", "--data", str(gsm), "--completions",
                          str(_jsonl(tmp_path / "g.jsonl", [{"index": 0, "completion": "#### 2"}])),
                          "--out", str(tmp_path / "g")]) == 0
    (rec,) = _records(tmp_path / "g")
    assert rec["reference"] == "1 + 1 = 2\n#### 2" and "prompt" not in rec  # no model: no chat template to show
    mc = _jsonl(tmp_path / "mc.jsonl", [{"question": "Sky?", "choices": ["blue", "green"], "answer": 0},
                                        {"question": "Grass?", "choices": ["blue", "green"], "answer": "B"}])
    model = ["--model", "tiny-moe", "--max-new-tokens", "4", "--device", "cpu"]
    for mode in ("loglik", "letter"):
        assert evaluate.main([*model, "--task", "mc", "--data", str(mc), "--mc-mode", mode,
                              "--out", str(tmp_path / mode)]) == 0
        assert [r["reference"] for r in _records(tmp_path / mode)] == ["A. blue", "B. green"]
        assert all(r["prompt"].count("Sky?") + r["prompt"].count("Grass?") == 1 for r in _records(tmp_path / mode))
    assert evaluate.main([*model, "--task", "tiny-arith", "--limit", "2", "--out", str(tmp_path / "t")]) == 0
    tok = minimoe.load_tokenizer("tiny-moe")
    rows = tiny_arith_split("test")[:2]
    assert [(r["prompt"], r["reference"]) for r in _records(tmp_path / "t")] == \
        [(task_prompt("tiny-arith", {"question": q}, tok), a) for q, a in rows]


@pytest.mark.slow
def test_grading_shared_out_over_processes_resumes_with_another_count(tmp_path, graded_programs):
    """The world plumbing with OUT.partial: each process grades i % N == rank into its own file; a rerun with
    another number of processes grades nothing again, and every process gets the one-process result."""
    from dataclasses import dataclass

    from minimoe.eval.progress import Progress
    from minimoe.eval.runners import grade
    from minimoe.parallel.distributed import World

    @dataclass(frozen=True)
    class Rank(World):
        parts: tuple = ()  # what each process contributes to a gather (this one's own: its value)

        def gather(self, value, device="cpu"):
            return [value if r == self.rank else (self.parts[r] if self.parts else []) for r in range(self.size)]

    rows = FOUR + FOUR[:1]
    completions = [["    return a + b\n", "    return a\n"] if p["entry_point"] == "add" else ["    return -a\n"]
                   for p in rows]
    one = grade("humaneval", rows, completions, ks=(1,))
    programs = len(graded_programs)
    path = tmp_path / "out.partial"
    Progress.open(path, {"run": 1})
    for r in (0, 1):  # two processes, one after the other here
        grade("humaneval", rows, completions, ks=(1,), world=Rank(r, 2), progress=Progress(path, Rank(r, 2)))
    assert sorted(p.name for p in path.iterdir()) == ["rank-0.jsonl", "rank-1.jsonl", "run.json"]
    assert len(graded_programs) == 2 * programs
    done = Progress(path).graded()
    for size in (1, 3):  # resumed by one process, then by three
        parts = tuple([(i, done[i]) for i in sorted(done) if i % size == r] for r in range(size))
        for r in range(size):
            got = grade("humaneval", rows, completions, ks=(1,), world=Rank(r, size, 0, parts),
                        progress=Progress(path, Rank(r, size)))
            assert got == one
    assert len(graded_programs) == 2 * programs  # nothing graded again


def test_the_sandbox_is_chosen_recorded_or_refused_up_front(tmp_path, capsys, monkeypatch):
    import shutil

    from minimoe.eval import sandbox

    data = _jsonl(tmp_path / "he.jsonl", HUMANEVAL)
    samples = _jsonl(tmp_path / "c.jsonl", [{"task_id": "T/0", "completion": "    return a + b\n"},
                                            {"task_id": "T/1", "completion": "    return a\n"}])
    args = ["--task", "humaneval", "--data", str(data), "--completions", str(samples), "--k", "1"]
    if shutil.which("bwrap"):
        assert evaluate.main([*args, "--sandbox", "bwrap", "--out", str(tmp_path / "b")]) == 0
        summary = json.loads((tmp_path / "b/summary.json").read_text())
        assert summary["sandbox"] == "bwrap" and summary["pass@1"] == 0.5
    # without bubblewrap (here: made to look missing), asking for it is an error before anything is graded
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(evaluate, "grade", lambda *a, **k: pytest.fail("graded without the sandbox asked for"))
    sandbox._bwrap_problem.cache_clear()
    try:
        capsys.readouterr()
        assert evaluate.main([*args, "--sandbox", "bwrap", "--out", str(tmp_path / "n")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --sandbox bwrap needs bubblewrap") and err.count("\n") == 1
        assert not (tmp_path / "n").exists() and not (tmp_path / "n.partial").exists()
    finally:
        sandbox._bwrap_problem.cache_clear()
