"""``--fsdp``: shard the frozen base over the processes with FSDP2 (``fully_shard``), keep the adapters whole.

Each decoder layer, then the model, is a ``fully_shard`` unit over a 1-D mesh of all processes: a process
holds 1/N of every base weight and all-gathers a layer's weights just before computing it. The adapters'
own parameters are ``ignored_params``: they stay ordinary, replicated tensors, so prune/grow/slice work on
them exactly as in one process (a new rank is a new tensor FSDP never sees) and their gradients are summed
by ``World.all_reduce_grads`` like every other data-parallel gradient. The model is loaded into CPU memory
(every process holds the whole base in host RAM while it starts: the experts are stacked on load), the
adapters are attached there and moved to the device, and ``fully_shard`` moves each process's shard of the
base to the device: no process ever holds the whole base on its GPU.

Full fine-tuning trains the sharded weights themselves: FSDP reduce-scatters their gradients (summed, like
the replicated ones: ``set_gradient_divide_factor(1.0)``, since the loss is already normalised by the global
token count), only on the last micro-batch of a step (``set_requires_gradient_sync``), and the optimizer
state is sharded with them. Checkpoints and the final export hold whole tensors: every process takes part
in gathering them (``full``), the first writes; a resume scatters them back (``shard_like``). ESFT's trained
experts are an adapter (replicated); only its frozen base is sharded. Its expert scoring runs before the
sharding, on the CPU copy of the model: refused on CUDA (``strategy.problem``).
"""

from __future__ import annotations

import torch
from torch import nn

def shard(model: nn.Module, world, device: str) -> None:
    """Move the adapters to ``device`` and shard everything else over the processes (layer by layer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ignored = model.adapter_parameters()
    for p in ignored:
        p.data = p.data.to(device)
    ignored_ids = {id(p) for p in ignored}
    mesh = init_device_mesh(torch.device(device).type, (world.size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, ignored_params={p for p in layer.parameters() if id(p) in ignored_ids})
    fully_shard(model, mesh=mesh, ignored_params=set(ignored))
    for unit in (*model.layers, model):  # each fully_shard unit reduces its own gradients
        unit.set_gradient_divide_factor(1.0)  # sum: the loss is normalised by the global token count already
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied sum)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce-scatter the sharded trained weights' gradients in this backward (the step's last micro-batch)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every process calls it in the same order); ``t`` as is
    when it is not sharded."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor (the same on every process) cut the way ``param`` is sharded; as is for a plain one."""
    if not is_sharded(param):
        return value.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
