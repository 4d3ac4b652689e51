"""train.py under torchrun with a fault injected on rank 1 (for test_distributed.py). MINIMOE_TEST_FAULT=nan
(default): before step 4 that process's copy of the model is poisoned with NaN, so its loss is non-finite and
it stops; the others must not hang. =drift: after the last step one of its adapter weights is nudged, so the
replicas differ and the run must refuse to save them. =data: that process reads two thirds of the data file's
rows (another version of the file on its machine); =config: it is given --lr 0.5 besides the others' flags:
both must be refused at start."""

import os
import sys

import torch

from minimoe.cli import train as train  # noqa: E402
from minimoe.train import trainer as trainer_mod  # noqa: E402

FAULT = os.environ.get("MINIMOE_TEST_FAULT", "nan")

argv = sys.argv[1:]
if os.environ.get("RANK") == "1":
    real_load = trainer_mod.load_pairs
    if FAULT == "data":
        trainer_mod.load_pairs = lambda *a, **k: (lambda pairs: pairs[: 2 * len(pairs) // 3])(real_load(*a, **k))
    if FAULT == "config":
        argv += ["--lr", "0.5"]
    real_step = trainer_mod.Trainer.train_step

    def train_step(self):
        if FAULT == "nan" and self.step == 3:
            with torch.no_grad():
                self.model.embed_tokens.weight.fill_(float("nan"))
        record = real_step(self)
        if FAULT == "drift" and self.step == self.config.steps:  # after the last step, before the check
            with torch.no_grad():
                self.model.adapter_parameters()[0].view(-1)[0] += 1e-3
        return record

    trainer_mod.Trainer.train_step = train_step

sys.exit(train.main(argv))
