"""The learning-rate schedules of the papers: a linear warm-up, then linear decay (EPnG: the transformers
Trainer's default), cosine decay (DMEP) or a constant rate."""

from __future__ import annotations

import math

import torch


def lr_schedule(optimizer, steps: int, warmup_ratio: float, kind: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``round(warmup_ratio · steps)`` steps, then ``kind``: ``linear`` decay to 0 at
    ``steps`` (the transformers Trainer's default, EPnG App. A.3), ``cosine`` decay to 0 (DMEP §IV), or
    ``constant``."""
    warm = max(1, int(round(warmup_ratio * steps))) if warmup_ratio > 0 else 0

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        done = min(1.0, (s - warm) / max(1, steps - warm))
        if kind == "linear":
            return 1.0 - done
        return 1.0 if kind == "constant" else 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
