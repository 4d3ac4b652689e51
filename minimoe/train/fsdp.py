"""``--fsdp``: shard the frozen base over the processes with FSDP2 (``fully_shard``), keep the adapters whole.

Each decoder layer, then the model, is a ``fully_shard`` unit over a 1-D mesh of all processes: a process
holds 1/N of every base weight and all-gathers a layer's weights just before computing it. The adapters'
own parameters are ``ignored_params``: they stay ordinary, replicated tensors, so prune/grow/slice work on
them exactly as in one process (a new rank is a new tensor FSDP never sees) and their gradients are summed
by ``World.all_reduce_grads`` like every other data-parallel gradient. The model is loaded into CPU memory
(memory-mapped safetensors), the adapters are attached there and moved to the device, and ``fully_shard``
moves each process's shard of the base to the device: no process ever holds the whole base on its GPU.

Policies that train base weights (``full``, ``esft``) are refused with ``--fsdp`` (``check``): their trained
weights would be sharded DTensors, whose checkpoints and exports need a gather this module does not do.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.base import adapters_of

SUPPORTED = ("lora", "epng", "dmep")


def check(policy: str, world) -> str | None:
    """Why ``--fsdp`` cannot run this way (None if it can)."""
    if policy not in SUPPORTED:
        return (f"--fsdp with --policy {policy}: FSDP here shards the frozen base of adapter policies "
                f"({', '.join(SUPPORTED)}); {policy} trains base weights — train it without --fsdp")
    if not world.distributed:
        return "--fsdp needs several processes: start train.py with torchrun --nproc_per_node N"
    return None


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in adapters_of(model).values() for p in m.adapter_parameters()]


def shard(model: nn.Module, world, device: str) -> None:
    """Move the adapters to ``device`` and shard everything else over the processes (layer by layer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ignored = adapter_parameters(model)
    for p in ignored:
        p.data = p.data.to(device)
    ignored_ids = {id(p) for p in ignored}
    mesh = init_device_mesh(torch.device(device).type, (world.size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, ignored_params={p for p in layer.parameters() if id(p) in ignored_ids})
    fully_shard(model, mesh=mesh, ignored_params=set(ignored))


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
