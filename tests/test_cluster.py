"""Several processes as a cluster treats them (torchrun, gloo on CPU, 2 processes): preempted through the
launcher or on one rank (checkpoint in lockstep, bit-identical resume), a rank stopped (SIGSTOP) or killed
(SIGKILL) and named by the survivor and by torchrun's report. Steps are slowed to 0.2 s (tests/slow_train.py)
so that signals land inside the run."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minimoe.train.stopping import PREEMPTED
from test_preemption import RUN, _same_run, _wait_for_steps

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def launch(args, *torchrun_args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *torchrun_args,
           str(ROOT / "tests" / "slow_train.py"), *RUN, *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def worker(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (its child whose environment says RANK=rank)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == launcher.pid and f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank}")


def root_cause_rank(stderr: str) -> int:
    """The rank torchrun's report names as the root cause."""
    return int(re.search(r"Root Cause.*?rank\s*:\s*(\d+)", stderr, re.S)[1])


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted 2-process run the preempted ones are compared with."""
    run = tmp_path_factory.mktemp("whole") / "run"
    proc = launch(["--steps", "10", "--out", str(run)])
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return run


@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_preemption_checkpoints_every_rank_at_one_step_and_resumes_bit_for_bit(whole, tmp_path, target):
    """SIGTERM to torchrun (SLURM, Kubernetes: torchrun passes it to every worker), or SIGUSR1 to one worker
    only (the other learns of it at the next step boundary)."""
    run = tmp_path / "run"
    proc = launch(["--steps", "10", "--out", str(run)])
    _wait_for_steps(run, 3, proc)
    t = time.monotonic()
    if target == "launcher":
        proc.send_signal(signal.SIGTERM)
    else:
        os.kill(worker(proc, 1), signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    stopped_in = time.monotonic() - t
    assert proc.returncode != 0  # torchrun reports its workers' exit status 75 as a failure
    assert f"exitcode  : {PREEMPTED}" in err or target == "launcher", err[-3000:]
    step = json.loads((run / "checkpoint" / "trainer.json").read_text())["step"]
    assert 3 <= step < 10 and out.count(f"preempted: saved step {step}") == 1, out  # one process speaks
    assert stopped_in < 60
    resumed = launch(["--resume", str(run)])
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    _same_run(run, whole)


def test_a_stopped_rank_is_named_and_every_live_rank_stops_after_the_timeout(tmp_path):
    run = tmp_path / "run"
    proc = launch(["--steps", "400", "--dist-timeout", "10", "--out", str(run)])
    _wait_for_steps(run, 3, proc)
    stopped = worker(proc, 1)
    os.kill(stopped, signal.SIGSTOP)  # e.g. a hung disk or GPU: alive, silent
    t = time.monotonic()
    out, err = proc.communicate(timeout=120)
    ended_in = time.monotonic() - t
    assert proc.returncode != 0
    assert re.search(rf"rank 0/2: error: waited 1\d s in a collective \(--dist-timeout 10\) for: rank 1 \(pid "
                     rf"{stopped} on this host\) is silent: no heartbeat", err), err[-3000:]
    assert f"process {stopped}, stopped (SIGSTOP), was ended with SIGKILL" in err
    assert root_cause_rank(err) == 0  # the rank that reported it, naming the stopped one
    assert ended_in < 30  # the timeout, the watchdog's period (2 s), slack for a loaded machine


def test_a_killed_rank_is_named_by_the_survivor_and_by_torchrun(tmp_path):
    run = tmp_path / "run"
    proc = launch(["--steps", "400", "--out", str(run)])
    _wait_for_steps(run, 3, proc)
    killed = worker(proc, 1)
    t = time.monotonic()
    os.kill(killed, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert time.monotonic() - t < 30
    assert f"rank 0/2: error: rank 1 (pid {killed} on this host) has ended without reporting an error" in err
    assert root_cause_rank(err) == 1, err[-3000:]  # not the survivor


@pytest.mark.parametrize("fault, said", [
    ("data", "rank 1's data differ from rank 0's: 200 examples against 300 (--data "),
    ("config", "rank 1's configuration differs from rank 0's: lr 0.5 against 0.001"),
])
def test_a_rank_with_other_data_or_flags_is_refused_at_start(tmp_path, fault, said):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "response": f" {i + 1}"}) + "\n" for i in range(300)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_failing_rank.py"), *RUN, "--steps", "4", "--lr", "0.001", "--data", str(data),
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "MINIMOE_TEST_FAULT": fault})
    assert proc.returncode != 0 and f"rank 0/2: error: {said}" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step


def test_the_slurm_example_checkpoints_requeues_and_resumes(tmp_path):
    """examples/slurm.sbatch as SLURM runs it: SIGUSR1 to the batch script (--signal=B:USR1@300) → the run
    checkpoints, the script requeues the job (a stand-in scontrol records it); the requeued job resumes and
    finishes, bit for bit the run of a job never signalled, which requeues nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "42", "NPROC": "2", "PYTHONPATH": str(ROOT),
           "TRAIN_ARGS": " ".join([*RUN, "--data", "tiny-arith", "--steps", "150"])}
    job = lambda run: subprocess.Popen(["bash", str(ROOT / "examples" / "slurm.sbatch")], cwd=tmp_path,
                                       env={**env, "RUN": str(run)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    run, whole = tmp_path / "run", tmp_path / "whole"
    first = job(run)
    _wait_for_steps(run, 3, first)
    first.send_signal(signal.SIGUSR1)
    out, err = first.communicate(timeout=120)
    assert (tmp_path / "scontrol.log").read_text() == "requeue 42\n", err[-3000:]
    step = json.loads((run / "checkpoint" / "trainer.json").read_text())["step"]
    assert 3 <= step < 150 and f"preempted: saved step {step}" in out and not (run / "summary.json").exists()
    requeued = job(run)
    out, err = requeued.communicate(timeout=240)
    assert requeued.returncode == 0 and f"(resumed at step {step})" in out, err[-3000:]
    never = job(whole)
    assert never.communicate(timeout=240) and never.returncode == 0
    assert (tmp_path / "scontrol.log").read_text() == "requeue 42\n"  # only the signalled job requeued
    _same_run(run, whole)
