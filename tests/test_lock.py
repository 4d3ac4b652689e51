"""The run directory's lock: one run at a time writes a run directory; a lock whose run is gone is taken over."""

import json
import socket
import subprocess
import sys
import time

import pytest

from minimoe.cli import train
from minimoe.train.config import TrainConfig
from minimoe.train.lock import RunLock, RunLockError
from minimoe.train.trainer import Trainer, TrainingError

HOLD = ("import sys, time\nfrom minimoe.train.lock import RunLock\nRunLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\ntime.sleep(60)\n")


@pytest.fixture
def held(tmp_path):
    """A run directory whose lock another live process holds."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run, proc.pid
    proc.kill()
    proc.wait()


def _args(run, *extra):
    return ["--policy", "lora", "--model", "tiny-olmoe", "--steps", "2", "--batch-size", "2", "--eval-limit", "0",
            "--out", str(run), *extra]


def test_a_live_lock_refuses_a_start_an_overwrite_and_a_resume_naming_its_holder(held, capsys):
    run, pid = held
    for extra in ([], ["--overwrite"]):
        assert train.main(_args(run, *extra)) == 2
        err = capsys.readouterr().err
        assert f"run directory {run} is in use by another run (pid {pid} on {socket.gethostname()}" in err
    assert not run.exists()  # nothing was written
    with pytest.raises(TrainingError, match=f"in use by another run \\(pid {pid}"):
        Trainer(TrainConfig(policy="lora", model="tiny-olmoe", resume=str(run))).setup()


def test_a_run_holds_the_lock_for_its_life_and_gives_it_up(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(TrainConfig(policy="lora", model="tiny-olmoe", out=str(run), steps=2, batch_size=2,
                                  eval_limit=0), show_progress=False).setup()
    lock = RunLock(run)
    assert lock.holder()["pid"] == trainer.lock.holder()["pid"] and lock.path == run.parent / ".run.lock"
    trainer.train()
    assert lock.holder() is None and not lock.path.exists()
    with pytest.raises(TrainingError):  # a setup that fails gives the lock up too
        Trainer(TrainConfig(policy="lora", model="tiny-olmoe", out=str(run), steps=2, max_len=10**6)).setup()
    assert not lock.path.exists()


def test_a_lock_left_by_a_run_that_is_gone_is_taken_over_with_a_message(tmp_path, capsys):
    run = tmp_path / "run"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    lock = RunLock(run)
    lock.path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started": time.time(),
                                     "heartbeat": time.time()}))
    assert train.main(_args(run)) == 0
    assert f"took over the lock of a run that is gone (pid {dead} on {socket.gethostname()}" in capsys.readouterr().out
    assert not lock.path.exists()


def test_on_a_shared_filesystem_another_hosts_lock_lives_while_its_heartbeat_is_fresh(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run, lease_s=60)
    other = {"host": "node-17", "pid": 4242, "started": time.time() - 600}
    lock.path.write_text(json.dumps({**other, "heartbeat": time.time() - 5}))
    with pytest.raises(RunLockError, match="in use by another run \\(pid 4242 on node-17"):
        lock.acquire()
    lock.path.write_text(json.dumps({**other, "heartbeat": time.time() - 120}))  # its lease ran out
    assert "took over the lock of a run that is gone (pid 4242 on node-17" in lock.acquire()
    assert lock.holder()["host"] == socket.gethostname()
    lock.release()


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    lock = RunLock(tmp_path / "run", lease_s=0.2)  # a heartbeat every 0.05 s
    lock.acquire()
    first = lock.holder()["heartbeat"]
    deadline = time.time() + 5
    while lock.holder()["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.02)
    assert lock.holder()["heartbeat"] > first
    lock.release()
    assert lock.holder() is None
