"""train.py under torchrun with a failure injected on rank 1 (for test_distributed.py): before step 4, that
process's copy of the model is poisoned with NaN, so its loss is non-finite and it stops; the others must
not hang."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from minimoe.train import trainer as trainer_mod  # noqa: E402

if os.environ.get("RANK") == "1":
    real_step = trainer_mod.Trainer.train_step

    def train_step(self):
        if self.step == 3:
            with torch.no_grad():
                self.model.embed_tokens.weight.fill_(float("nan"))
        return real_step(self)

    trainer_mod.Trainer.train_step = train_step

sys.exit(train.main(sys.argv[1:]))
