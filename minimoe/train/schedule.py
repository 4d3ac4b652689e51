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


SCHEDULE_ARGS = ("steps", "lr", "schedule", "warmup_ratio")  # what a resumed run's schedule is made of


def rebase(optimizer, scheduler, saved: dict, config) -> dict | None:
    """On resume, the schedule asked for now replaces the saved run's: ``scheduler`` was built from ``config``
    (``--steps``, ``--schedule``, ``--warmup-ratio``) and loaded with the checkpoint's peak rates, which a new
    ``--lr`` scales (each parameter group keeps its ratio to it). The learning rate continues at the current
    step of the new schedule. Returns the ``schedule`` event (what changed, the rate before and after), or None
    when the schedule is the saved one."""
    changed = {k: [saved[k], getattr(config, k)] for k in SCHEDULE_ARGS
               if k in saved and saved[k] != getattr(config, k)}
    if "lr" in changed and saved.get("lr"):
        scheduler.base_lrs = [base * config.lr / saved["lr"] for base in scheduler.base_lrs]
    elif "lr" in changed:
        scheduler.base_lrs = [config.lr for _ in scheduler.base_lrs]
    before = optimizer.param_groups[0]["lr"]
    for group, base, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * f(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if not changed:
        return None
    return {"event": "schedule", "step": scheduler.last_epoch, "changed": changed,
            "steps_planned": saved.get("steps"), "steps": config.steps,
            "lr_before": before, "lr_after": optimizer.param_groups[0]["lr"]}
