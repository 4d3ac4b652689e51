"""``minimoe train`` whose every optimizer step takes at least ``MINIMOE_TEST_STEP_S`` seconds (default 0.2):
time for a test to deliver a signal, or stop a process, while a run is inside its steps, as a cluster would.
The training itself is unchanged (the wait comes after the step)."""

import os
import sys
import time

from minimoe.cli import train
from minimoe.train import trainer as trainer_mod

STEP_S = float(os.environ.get("MINIMOE_TEST_STEP_S", "0.2"))
real_step = trainer_mod.Trainer.train_step


def train_step(self):
    t = time.monotonic()
    record = real_step(self)
    time.sleep(max(0.0, STEP_S - (time.monotonic() - t)))
    return record


trainer_mod.Trainer.train_step = train_step
sys.exit(train.main(sys.argv[1:]))
