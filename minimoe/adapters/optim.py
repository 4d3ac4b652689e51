"""Optimizer slices: keep a torch optimizer in step with parameters that appear, disappear or shrink.

Three operations cover every resize minimoe does, for any ``torch.optim`` optimizer whose state is
per-parameter tensors shaped like the parameter plus scalars (AdamW default/foreach/fused, Adam,
SGD with momentum), and for minimoe's ``AdamW`` (``adamw.py``), whose step count may be a tensor with one
count per row:

* ``add_params`` — new parameters join a param group. They get no state until their first step, so
  the optimizer treats them exactly as freshly created parameters (AdamW: step 0, zero moments, full
  bias correction).
* ``remove_params`` — parameters leave their group and their state is deleted (memory freed).
* ``reindex_param`` — a parameter is replaced by its rows ``index`` along ``dim`` (``slice_param``), or by
  those rows with new ones inserted (index -1). Every state tensor shaped like it, and a per-row step
  count, is re-indexed the same way: kept rows keep their moments and step bit for bit, new rows start
  at zero moments and step 0 (fresh-parameter Adam updates). Scalars are kept; new rows under a scalar
  step that has already counted are refused: that optimizer would treat them as that many steps old and
  over-step them several-fold (use minimoe's ``AdamW``). The new tensor takes the old one's place.

Param-group hyperparameters are never touched, so LR schedulers keep working. Call these at an
optimizer-step boundary (after ``step()``/``zero_grad()``); a pending ``.grad`` is re-indexed along.
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


def _per_row_step(state: dict) -> bool:
    step = state.get("step")
    return torch.is_tensor(step) and step.dim() == 1


def check_new_rows(optimizer: torch.optim.Optimizer | None, params: Iterable[torch.Tensor]) -> None:
    """Raise if rows inserted into ``params`` would not train as fresh parameters: their optimizer state has
    one step count for the whole tensor and it has counted (a stock AdamW after its first step)."""
    for p in params:
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        step = state.get("step")
        if step is not None and not _per_row_step(state) and float(step) > 0:
            raise ValueError(f"new rows would join a parameter whose optimizer state counts {int(float(step))} steps "
                             "for all its rows: this optimizer would over-step them; use minimoe.AdamW, "
                             "which counts steps per row")


def slice_param(optimizer: torch.optim.Optimizer | None, old: nn.Parameter, index: torch.Tensor,
                dim: int = 0) -> nn.Parameter:
    """Return ``Parameter(old.index_select(dim, index))`` and move ``old``'s optimizer state onto it."""
    return reindex_param(optimizer, old, index, dim)


def reindex_param(optimizer: torch.optim.Optimizer | None, old: nn.Parameter, index: torch.Tensor, dim: int = 0,
                  fill: torch.Tensor | None = None, group: dict | None = None) -> nn.Parameter:
    """A new parameter whose row j (along ``dim``) is ``old``'s row ``index[j]``, or for ``index[j] == -1`` a new
    row: the next row of ``fill`` (zeros without it). ``old``'s optimizer state moves onto it, re-indexed the
    same way (new rows: zero moments, step 0). ``old``'s place in its param group is taken; if ``old`` was in
    none, the new parameter joins ``group`` (when given). A ``row_dim`` mark (``adamw.py``) carries over."""
    index = torch.as_tensor(index, dtype=torch.long)
    n = old.shape[dim]
    fresh = index < 0
    if bool(fresh.any()):
        check_new_rows(optimizer, [old])
    per_row = optimizer is not None and _per_row_step(optimizer.state.get(old, {}))
    src = torch.where(fresh, n, index)  # row n: a zero row appended below

    def take(t: torch.Tensor) -> torch.Tensor:  # t shaped like old, or a per-row step count (1-d)
        d = dim if t.dim() > 1 else 0
        pad = list(t.shape)
        pad[d] = 1
        return torch.cat([t, t.new_zeros(pad)], d).index_select(d, src.to(t.device))

    data = take(old.detach())
    if fill is not None and bool(fresh.any()):
        data.index_copy_(dim, fresh.nonzero().flatten().to(data.device), fill.to(data))
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    if hasattr(old, "row_dim"):
        new.row_dim = old.row_dim
    if old.grad is not None:
        new.grad = take(old.grad)
    if optimizer is None:
        return new
    placed = False
    for g in optimizer.param_groups:
        if any(p is old for p in g["params"]):
            g["params"] = [new if p is old else p for p in g["params"]]
            placed = True
    if not placed and group is not None:
        group["params"].append(new)
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            k: (take(v) if torch.is_tensor(v) and (v.shape == old.shape or (k == "step" and per_row)) else v)
            for k, v in state.items()}
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
