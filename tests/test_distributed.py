"""Several processes (torchrun, gloo on CPU): N processes with per-process batch b train exactly like one
process with batch N·b — same prune/grow/slice decisions, same losses and adapters up to float reduction
order, identical replicas; stop and resume with the same or another number of processes; a failing rank
stops every rank."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
from minimoe.cli import train as train  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
COMMON = ["--eval-limit", "0", "--seed", "0"]
POLICIES = {
    "epng": ["--policy", "epng", "--model", "tiny-olmoe", "--steps", "12", "--epng-warmup", "4",
             "--epng-interval", "2"],
    "dmep": ["--policy", "dmep", "--model", "tiny-qwen3", "--steps", "8", "--dmep-prune-step", "4",
             "--dmep-log-interval", "2", "--dmep-num-experts", "4", "--dmep-rank", "4",
             "--dmep-targets", "q_proj", "v_proj", "up_proj"],
    "esft": ["--policy", "esft", "--model", "tiny-olmoe", "--steps", "4", "--esft-sample-batches", "2"],
    "full": ["--policy", "full", "--model", "tiny-olmoe", "--steps", "4"],
}


def torchrun(nproc: int, args: list[str], script: str = "train.py", timeout: float = 240, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _lines(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _adapter(run):
    """The run's fine-tune: its adapter, or (full fine-tuning) its model."""
    adapter = Path(run) / "adapter" / "adapter.safetensors"
    return load_file(str(adapter if adapter.exists() else Path(run) / "model" / "model.safetensors"))


def _close(x, y, exact: bool) -> bool:
    """Equal structures; floats (importance, scores, Gini, entropy, drift) within 1e-5 unless ``exact``."""
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_close(x[k], y[k], exact) for k in x)
    if isinstance(x, list):
        return isinstance(y, list) and len(x) == len(y) and all(_close(u, v, exact) for u, v in zip(x, y))
    if isinstance(x, float) and isinstance(y, float) and not exact:
        return x == y or abs(x - y) <= 1e-5 * max(1.0, abs(x)) or (x != x and y != y)
    return x == y or (isinstance(x, float) and x != x and y != y)


def _same_training(a, b, exact=False):
    """Two runs' per-step losses, event decisions and final adapters agree (bit for bit when ``exact``)."""
    ma, mb = _lines(Path(a) / "metrics.jsonl"), _lines(Path(b) / "metrics.jsonl")
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        assert x["tokens"] == y["tokens"] and x["trainable"] == y["trainable"]
        assert x["loss"] == y["loss"] if exact else abs(x["loss"] - y["loss"]) <= 1e-4 * abs(x["loss"]), x["step"]
    ea, eb = _lines(Path(a) / "events.jsonl"), _lines(Path(b) / "events.jsonl")
    assert len(ea) == len(eb)
    for x, y in zip(ea, eb):  # every field: the decisions exactly, the statistics they came from up to float order
        assert _close(x, y, exact), (x, y)
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]) if exact else torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), k
    return ea


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per policy: 2 processes x batch 4, and 1 process x batch 8 (the same global batch)."""
    out = {}
    for policy, args in POLICIES.items():
        base = tmp_path_factory.mktemp(policy)
        two = torchrun(2, [*args, *COMMON, "--batch-size", "4", "--out", str(base / "two")])
        assert two.returncode == 0, two.stderr[-3000:]
        assert train.main([*args, *COMMON, "--batch-size", "8", "--out", str(base / "one")]) == 0
        out[policy] = (base / "two", base / "one", two)
    return out


@pytest.mark.parametrize("policy", list(POLICIES))
def test_two_processes_train_like_one_with_the_same_global_batch(runs, policy):
    two, one, proc = runs[policy]
    events = _same_training(two, one)
    kinds = [e["event"] for e in events]
    # epng: events at steps 4, 6, 8, 10 (none at the last step, 12)
    expected = {"epng": ("prune_grow", 4), "dmep": ("dmep_prune", 1), "esft": ("esft_selection", 1),
                "full": (None, 0)}[policy]
    assert kinds.count(expected[0]) == expected[1]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 8 and summary["replicas_agree"]
    assert len(summary["peak_memory_mb"]) == 2 and all(m > 0 for m in summary["peak_memory_mb"])
    args = json.loads((two / "args.json").read_text())
    assert args["batch_size"] == 4 and args["world_size"] == 2 and args["global_batch"] == 8
    assert "4 x 1 accumulation x 2 processes = 8 sequences" in proc.stdout
    assert proc.stdout.count("done:") == 1  # one process speaks


def test_stop_and_resume_with_two_and_with_one_process(runs, tmp_path):
    args = [*POLICIES["epng"], *COMMON]
    stopped = tmp_path / "stopped"
    first = torchrun(2, [*args, "--batch-size", "4", "--stop-at", "5", "--out", str(stopped)])
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((stopped / "checkpoint" / "trainer.json").read_text())["step"] == 5
    again = tmp_path / "again"
    shutil.copytree(stopped, again)
    resumed = torchrun(2, ["--resume", str(stopped)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_training(stopped, runs["epng"][0], exact=True)  # same number of processes: bit for bit
    assert train.main(["--resume", str(again)]) == 0  # one process: batch 8, the same global batch
    assert json.loads((again / "summary.json").read_text())["global_batch"] == 8
    _same_training(again, runs["epng"][0])  # up to float reduction order


def test_a_resume_on_processes_that_cannot_share_the_global_batch_is_refused(runs, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun --nproc_per_node 3 would set
    with pytest.raises(SystemExit):
        train.resolve(["--resume", str(runs["epng"][0])])
    assert "hold 8 sequences (2 processes x --batch-size 4), which 3 processes cannot share evenly; pass " \
           "--batch-size" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train.resolve(["--resume", str(runs["epng"][0])]).batch_size == 2  # 4 x 2 = the same 8
    assert train.resolve(["--resume", str(runs["epng"][0]), "--batch-size", "3"]).batch_size == 3  # asked for


def test_replicas_that_drift_apart_are_an_error(tmp_path):
    run = tmp_path / "drifting"
    env = {**os.environ, "MINIMOE_TEST_FAULT": "drift"}  # rank 1 nudges one adapter weight after the last step
    proc = torchrun(2, [*POLICIES["epng"], *COMMON, "--batch-size", "4", "--out", str(run)],
                    script="tests/dist_failing_rank.py", env=env)
    assert proc.returncode != 0
    assert "error: the trained parameters differ between processes" in proc.stderr
    assert not (run / "summary.json").exists() and not (run / "adapter").exists()


def test_a_failing_rank_stops_every_rank_and_the_checkpoint_stays(tmp_path):
    run = tmp_path / "failing"
    start = time.monotonic()
    proc = torchrun(2, [*POLICIES["epng"], *COMMON, "--batch-size", "4", "--save-every", "2", "--out", str(run)],
                    script="tests/dist_failing_rank.py", timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 1/2: error: non-finite loss" in proc.stderr
    # rank 0 either saw its peer leave and named it, or torchrun stopped it first: it did not hang
    assert "rank 0/2: error: rank 1 stopped with exit status 1: non-finite loss" in proc.stderr or \
        "SIGTERM" in proc.stderr
    assert re.search(r"Root Cause.*?rank\s*:\s*1 ", proc.stderr, re.S)  # torchrun names the failing rank
    assert elapsed < 60  # nobody waited for a collective to time out
    assert json.loads((run / "checkpoint" / "trainer.json").read_text())["step"] == 2  # the last good one


@pytest.mark.parametrize("task", [["--task", "tiny-arith", "--limit", "12", "--num-samples", "2", "--temperature", "0.8",
                                   "--batch-size", "5", "--max-new-tokens", "24"],
                                  ["--task", "perplexity", "--data", "README.md"]])
def test_evaluation_shared_over_two_processes_writes_the_one_process_result(tmp_path, task):
    model = ["--model", "tiny-moe", "--device", "cpu"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "eval.py"), *model, *task, "--out", str(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    # one thread, as torchrun gives each of its processes: the same float summation order in every matmul
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(ROOT / "eval.py"), *model, *task, "--out", str(tmp_path / "one")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    for name in ("summary.json", "samples.jsonl"):
        got, want = (tmp_path / "two" / name).read_text(), (tmp_path / "one" / name).read_text()
        assert got == want, f"{name} differs:\n{got[:2000]}\n---\n{want[:2000]}\n{two.stderr[-2000:]}"
    assert two.stdout.count("wrote ") == 1


def test_fsdp_trains_like_replicated_data_parallel(runs, tmp_path):
    """--fsdp shards the frozen base; the adapters stay whole: the same training (epng, and lora on a bf16
    base), the same adapter file (base fingerprint included), and a sharded run resumes bit for bit."""
    epng = tmp_path / "epng-fsdp"
    proc = torchrun(2, [*POLICIES["epng"], *COMMON, "--batch-size", "4", "--fsdp", "--stop-at", "5",
                        "--out", str(epng)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = torchrun(2, ["--resume", str(epng)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_training(epng, runs["epng"][0], exact=True)  # the base is only gathered: bit for bit
    dmep = tmp_path / "dmep-fsdp"
    proc = torchrun(2, [*POLICIES["dmep"], *COMMON, "--batch-size", "4", "--fsdp", "--out", str(dmep)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_training(dmep, runs["dmep"][0], exact=True)
    config = json.loads((epng / "adapter" / "adapter_config.json").read_text())
    assert config["base_fingerprint"] == json.loads((runs["epng"][0] / "adapter" / "adapter_config.json")
                                                    .read_text())["base_fingerprint"]
    lora = ["--policy", "lora", "--model", "tiny-olmoe", "--steps", "4", "--dtype", "bfloat16",
            "--lora-dense-targets", "q_proj", "v_proj", *COMMON, "--batch-size", "4"]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        proc = torchrun(2, [*lora, *extra, "--out", str(tmp_path / f"lora-{name}")])
        assert proc.returncode == 0, proc.stderr[-3000:]
    _same_training(tmp_path / "lora-fsdp", tmp_path / "lora-ddp", exact=True)


@pytest.mark.parametrize("policy", ["esft", "full"])
def test_fsdp_trains_base_weights_like_replicated_data_parallel(runs, tmp_path, policy):
    """esft: its trained experts stay whole, the base is sharded; full: the trained weights themselves are
    sharded (gradients reduce-scattered, optimizer state sharded), gathered for the checkpoint and the
    export, scattered back on resume (with gradient accumulation, which syncs once per step)."""
    run = tmp_path / policy
    # esft scores sample_batches micro-batches (batch-size x processes): the same 4 x 2 as the reference run;
    # full fine-tuning accumulates 2 x 2 per process (one gradient sync per step)
    batch = ["--batch-size", "4"] if policy == "esft" else ["--batch-size", "2", "--grad-accum", "2"]
    args = [*POLICIES[policy], *COMMON, *batch, "--fsdp"]
    first = torchrun(2, [*args, "--stop-at", "2", "--out", str(run)])
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(2, ["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_training(run, runs[policy][0])  # the same global batch of 8


def test_fsdp_needs_several_processes(tmp_path, capsys):
    assert train.main(["--policy", "lora", "--fsdp", "--model", "tiny-olmoe", "--out", str(tmp_path / "r"),
                       *COMMON]) == 2
    err = capsys.readouterr().err
    assert "--fsdp needs several processes: start it with torchrun --nproc_per_node N -m minimoe train" in err
    assert not (tmp_path / "r").exists()


def test_the_scaling_benchmark_runs_one_and_two_processes(tmp_path):
    from minimoe.tools import scaling

    out = tmp_path / "scaling.json"
    assert scaling.main(["--model", "tiny-olmoe", "--steps", "2", "--global-batch", "4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["processes"], r["batch_per_process"]) for r in rows] == [(1, 4), (2, 2)]
    assert all(r["tokens_per_s"] > 0 for r in rows) and len(rows[1]["peak_memory_mb"]) == 2


def test_the_parallel_seam_speaks_once_and_asks_the_policy_not_its_name(capsys, monkeypatch):
    from types import SimpleNamespace

    from minimoe.parallel import strategy
    from minimoe.parallel.distributed import World, launched
    from minimoe.policies import POLICIES

    World(rank=1, size=2).print("from rank 1")
    World(rank=0, size=2).print("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched() == (2, 4, 0)
    two = World(rank=0, size=2)
    fsdp_on = SimpleNamespace(fsdp=True)
    runs_model = [name for name, cls in POLICIES.items() if cls.setup_runs_model]
    assert runs_model == ["esft"]
    assert "runs the whole model before it is sharded" in strategy.problem(fsdp_on, POLICIES["esft"], two, "cuda")
    assert strategy.problem(fsdp_on, POLICIES["esft"], two, "cpu") is None
    assert strategy.problem(fsdp_on, POLICIES["lora"], two, "cuda") is None
    assert "needs several processes" in strategy.problem(fsdp_on, POLICIES["lora"], World(), "cpu")
    assert strategy.load_device(fsdp_on, "cuda:0") == "cpu"
    assert strategy.load_device(SimpleNamespace(fsdp=False), "cuda:0") == "cuda:0"


@pytest.mark.parametrize("mode", [["--packing"], ["--group-by-length"]])
def test_packed_and_length_grouped_training_on_two_processes_is_that_of_one(tmp_path, mode):
    args = [*POLICIES["epng"], *COMMON, *mode]
    two = torchrun(2, [*args, "--batch-size", "4", "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert train.main([*args, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    _same_training(tmp_path / "two", tmp_path / "one")
