"""How the model is spread over the training processes, in one place: ``parallelize(model, world, config,
device)`` applies it — replicated (every process holds the whole model; the trainer sums the gradients) or,
with ``--fsdp``, the frozen base (and full fine-tuning's weights) sharded with FSDP2 (``fsdp.py``) — and returns
a ``Parallel`` that answers what the trainer asks of it: which parameters' gradients it sums itself, when the
sharded gradients are reduced, how a sharded value is gathered whole. The trainer never names FSDP.

What is refused (``problem``) and where the model is first loaded (``load_device``) are decided here too; a
policy says what it needs (``Policy.setup_runs_model``), this module never names a policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import fsdp
from .distributed import World


def problem(config, policy_cls, world: World, device: str) -> str | None:
    """Why the run cannot be spread as asked (None if it can)."""
    if not config.fsdp:
        return None
    if not world.distributed:
        return "--fsdp needs several processes: start it with torchrun --nproc_per_node N -m minimoe train"
    if policy_cls.setup_runs_model and device.startswith("cuda"):
        return (f"--fsdp with --policy {policy_cls.name} on CUDA: the policy runs the whole model before it is "
                "sharded, which --fsdp keeps in CPU memory (a GPU forward on CPU weights); train it without "
                "--fsdp, or on the CPU")
    return None


def load_device(config, device: str) -> str:
    """Where the base is read: the CPU when it will be sharded (each process's shard goes to ``device`` when
    ``parallelize`` runs: no process holds the whole base on its GPU), else ``device``."""
    return "cpu" if config.fsdp else device


@dataclass
class Parallel:
    """What the trainer needs of the model's spread over the processes (see the module docstring)."""

    world: World
    sharded: bool = False
    base_fingerprint: str | None = None  # taken while the base was whole (the adapter export needs it)

    def replicated(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters whose gradients the trainer sums over the processes (``World.all_reduce_grads``);
        sharded ones are reduce-scattered by FSDP in the backward."""
        return [p for p in params if not fsdp.is_sharded(p)]

    def sync_gradients(self, model: nn.Module, now: bool) -> None:
        """Whether this backward reduces the sharded gradients (only the step's last micro-batch does)."""
        if self.sharded:
            fsdp.set_gradient_sync(model, now)

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """The whole value behind a sharded one (a collective: every process calls it in the same order)."""
        return fsdp.full(t)


def parallelize(model: nn.Module, world: World, config, device: str, base_fingerprint: str | None = None
                ) -> Parallel:
    """Spread ``model`` (its adapters attached) over the processes as ``config.fsdp`` asks; see ``Parallel``.
    ``base_fingerprint``: the base's, if already taken (the start's agreement check takes it)."""
    if not config.fsdp:
        return Parallel(world)
    from ..adapters.io import fingerprint

    whole = base_fingerprint or fingerprint(model)
    fsdp.shard(model, world, device)
    return Parallel(world, sharded=True, base_fingerprint=whole)
