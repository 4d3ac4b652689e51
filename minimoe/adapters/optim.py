"""Optimizer slices: keep a torch optimizer in step with parameters that appear, disappear or shrink.

Three operations cover every resize minimoe does, for any ``torch.optim`` optimizer whose state is
per-parameter tensors shaped like the parameter plus scalars (AdamW default/foreach/fused, Adam,
SGD with momentum):

* ``add_params`` — new parameters join a param group. They get no state until their first step, so
  the optimizer treats them exactly as freshly created parameters (AdamW: step 0, zero moments, full
  bias correction). This is why adapters grow by *new tensors* rather than by padding old ones:
  padding under an old AdamW step count over-steps the new rows several-fold.
* ``remove_params`` — parameters leave their group and their state is deleted (memory freed).
* ``slice_param`` — a parameter is replaced by ``old.index_select(dim, index)``; every state tensor
  shaped like it is sliced the same way (kept rows keep their moments bit for bit), scalars such as
  AdamW's ``step`` are kept, and the new tensor takes the old one's place in its group.

Param-group hyperparameters are never touched, so LR schedulers keep working. Call these at an
optimizer-step boundary (after ``step()``/``zero_grad()``); a pending ``.grad`` is sliced along.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _groups_of(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> list[dict]:
    ids = {id(p) for p in params}
    return [g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])]


def find_group(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> dict | None:
    """The param group holding any of ``params`` (None if none of them is in the optimizer)."""
    groups = _groups_of(optimizer, params)
    return groups[0] if groups else None


def add_params(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], group: dict | None = None) -> None:
    """Append ``params`` to ``group`` (default: the first group). They start with empty state."""
    group = group if group is not None else optimizer.param_groups[0]
    present = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for p in params:
        if id(p) in present:
            raise ValueError("parameter is already in the optimizer")
        group["params"].append(p)


def remove_params(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Drop ``params`` from their groups and delete their state."""
    params = list(params)
    ids = {id(p) for p in params}
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    for p in params:
        optimizer.state.pop(p, None)


def slice_param(optimizer: torch.optim.Optimizer | None, old: nn.Parameter, index: torch.Tensor,
                dim: int = 0) -> nn.Parameter:
    """Return ``Parameter(old.index_select(dim, index))`` and move ``old``'s optimizer state onto it."""
    index = index.to(old.device)
    new = nn.Parameter(old.detach().index_select(dim, index).clone(), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = old.grad.index_select(dim, index).clone()
    if optimizer is None:
        return new
    for g in optimizer.param_groups:
        g["params"] = [new if p is old else p for p in g["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            k: (v.index_select(dim, index).clone() if torch.is_tensor(v) and v.shape == old.shape else v)
            for k, v in state.items()
        }
    return new


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (what prune frees and grow adds)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Elements in state tensors shaped like their parameter (moments, momentum buffers)."""
    total = 0
    for p, s in optimizer.state.items():
        total += sum(v.numel() for v in s.values() if torch.is_tensor(v) and v.shape == p.shape)
    return total
