"""``AdamW`` with a step count per row, for parameters that grow rows while they train.

Expert LoRA keeps all experts' ranks of one projection in one tensor (``lora_A [Σr, in]``, ``lora_B [out, Σr]``,
``expert_lora.py``): two tensors per projection instead of two per expert and growth event, so the optimizer
and the packing touch a handful of tensors per step. Growth inserts rows into those tensors. A stock AdamW
keeps one step count per tensor: rows inserted at step 1000 would get step 1000's bias correction and
move several times too far on their first update. Here a parameter marked ``row_dim`` (``mark_rows``) keeps
``state["step"]`` as a float tensor with one count per row along that dimension; a new row starts at 0, so
its first update is a fresh parameter's (``optim.reindex_param`` re-indexes the counts with the moments).

Every other parameter goes through ``torch.optim.AdamW`` unchanged (its default/foreach/fused path, as
configured). Row-marked parameters are updated with exactly the arithmetic of torch's single-tensor AdamW,
``bias_correction`` and ``step_size`` computed on the host per distinct step count: while all rows share one
count the result is bit-identical to ``torch.optim.AdamW`` on the same tensor (and to the per-chunk tensors
minimoe kept before), which is what lets old checkpoints resume exactly.
"""

from __future__ import annotations

import torch
from torch import nn


def mark_rows(param: nn.Parameter, dim: int) -> nn.Parameter:
    """Tell ``AdamW`` to count steps per row of ``param`` along ``dim`` (rows may be inserted later)."""
    param.row_dim = dim
    return param


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` plus per-row step counts for parameters marked by ``mark_rows`` (no amsgrad)."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        if any(g["amsgrad"] for g in self.param_groups):
            raise ValueError("minimoe's AdamW does not support amsgrad")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rows = [(g, p) for g in self.param_groups for p in g["params"]
                if p.grad is not None and getattr(p, "row_dim", None) is not None]
        hidden = [(p, p.grad) for _, p in rows]
        for p, _ in hidden:  # torch's step skips parameters without a gradient
            p.grad = None
        try:
            super().step()
        finally:
            for p, grad in hidden:
                p.grad = grad
        for group, p in rows:
            self._row_step(group, p)
        return loss

    def _row_step(self, group: dict, p: torch.Tensor) -> None:
        """torch's single-tensor AdamW update with the step count (and so the bias correction) of each row."""
        dim, n = p.row_dim, p.shape[p.row_dim]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(n, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        lr = float(lr)
        grad = p.grad if not group["maximize"] else -p.grad
        exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        step_t += 1
        if wd != 0:
            p.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        steps, which = torch.unique(step_t, return_inverse=True)  # few distinct counts: one per growth
        steps = steps.tolist()  # (a state loaded by torch's load_state_dict under fused may sit on the GPU)
        if len(steps) == 1:
            step = steps[0]
            denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1 ** step)))
            return
        # per row: the same host scalars, rounded to the parameter's dtype as addcdiv/div round them
        shape = [1] * p.dim()
        shape[dim] = n

        def col(values: list[float]) -> torch.Tensor:  # one value per distinct count → one per row
            return torch.tensor(values, dtype=torch.float64, device=which.device)[which].to(p).view(shape)

        bc2_sqrt = col([(1 - beta2 ** s) ** 0.5 for s in steps])
        neg_step_size = col([-(lr / (1 - beta1 ** s)) for s in steps])
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        p.add_(exp_avg * neg_step_size / denom)
