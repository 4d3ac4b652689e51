"""Stopping on a cluster's signals (stopping.py): SIGTERM and SIGUSR1 finish the step, checkpoint and exit 75;
a signal during the checkpoint waits for it; the resumed run is bit-identical to one never stopped. Signals are
sent to real processes, as a terminal, SLURM, Kubernetes or torchrun send them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minimoe.train.stopping import INTERRUPTED, PREEMPTED, REPEAT_S, StopRequests
from minimoe.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--policy", "lora", "--model", "tiny-olmoe", "--batch-size", "2", "--eval-limit", "0", "--seed", "0"]


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _same_run(a, b):
    """Bit for bit: every step's loss and gradient norm, and the final checkpoint's weights."""
    strip = lambda run: [{k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")}
                         for m in _lines(Path(run) / "metrics.jsonl")]
    assert strip(a) == strip(b)
    wa, wb = (load_file(Path(r) / "checkpoint" / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _wait_for_steps(run: Path, n: int, proc, timeout: float = 120):
    """Until ``run``'s metrics hold ``n`` steps (the run is inside its steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = run / "metrics.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{run}: fewer than {n} steps after {timeout} s")


def test_a_repeated_signal_is_one_request_and_a_signal_during_a_checkpoint_waits(capsys):
    with StopRequests() as stops:
        signal.raise_signal(signal.SIGINT)
        assert stops.requested and not stops.preempted
        signal.raise_signal(signal.SIGINT)  # the same Ctrl-C delivered twice (terminal and torchrun)
        with stops.saving():
            stops._first_at -= REPEAT_S  # a second press, later, while a checkpoint is written: it waits
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)  # a preemption after the Ctrl-C: the status says "resume"
        assert stops.preempted
        signal.raise_signal(signal.SIGTERM)  # a repeated SIGTERM never stops at once (SIGKILL does)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C pressed again, outside a checkpoint: at once
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back
    assert "Ctrl-C: finishing this step, then saving" in capsys.readouterr().out


def test_sigterm_checkpoints_the_step_and_the_resume_is_bit_identical(tmp_path, monkeypatch):
    c = TrainConfig(policy="lora", out=str(tmp_path / "p"), steps=6, batch_size=2)
    trainer = Trainer(c, show_progress=False).setup()
    real_step, real_save = trainer.train_step, trainer.run.save_checkpoint

    def step():
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # during step 3: it finishes, is saved, the run stops
        return real_step()

    def save(*a, **k):  # SIGTERM and Ctrl-C again while the checkpoint is written: it completes first
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*a, **k)

    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(trainer.run, "save_checkpoint", save)
    assert trainer.train() == {"interrupted": True, "step": 3, "exit_code": PREEMPTED}
    assert json.loads((tmp_path / "p/checkpoint/trainer.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    Trainer(TrainConfig(policy="lora", steps=6, batch_size=2, resume=str(tmp_path / "p")), show_progress=False).train()
    Trainer(TrainConfig(policy="lora", out=str(tmp_path / "u"), steps=6, batch_size=2), show_progress=False).train()
    _same_run(tmp_path / "p", tmp_path / "u")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_the_command_checkpoints_on_a_signal_and_exits_with_its_documented_status(tmp_path, sig):
    run, whole = tmp_path / "run", tmp_path / "whole"
    cmd = [sys.executable, str(ROOT / "tests" / "slow_train.py"), *RUN, "--steps", "10"]
    proc = subprocess.Popen([*cmd, "--out", str(run)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_steps(run, 3, proc)
    t = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    stopped_in = time.monotonic() - t
    assert proc.returncode == (INTERRUPTED if sig == signal.SIGINT else PREEMPTED), err
    step = json.loads((run / "checkpoint" / "trainer.json").read_text())["step"]
    assert 3 <= step < 10 and f"saved step {step} to {run / 'checkpoint'}" in out and "Traceback" not in err
    assert [m["step"] for m in _lines(run / "metrics.jsonl")] == list(range(1, step + 1))
    assert stopped_in < 30  # one step of 0.2 s and a checkpoint (generous for a loaded CI machine)
    again = subprocess.run([*cmd, "--resume", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert subprocess.run([*cmd, "--out", str(whole)], cwd=ROOT, capture_output=True, timeout=120).returncode == 0
    _same_run(run, whole)
