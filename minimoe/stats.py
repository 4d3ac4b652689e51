"""Streaming routing statistics: soft importance, hard counts, Gini, normalised entropy, drift.

One ``RoutingStats`` holds, per *unit* (a decoder-layer index for routed experts, a module path for a
LoRA-MoE), fp32 running sums over real tokens:

* ``importance`` — Σ of the full softmax router probabilities (EPnG's p̄ = importance / tokens);
* ``counts`` — hard top-k choices per expert;
* ``tokens`` — how many tokens contributed.

``decay(λ)`` multiplies all three by λ (EPnG: "decay gate statistics" after each event), so the mean
keeps its value but history weighs λ against new tokens. Feed it only training forwards, at
micro-batch granularity; decide only at optimizer-step boundaries.
"""

from __future__ import annotations

import math

import torch


def gini(counts: torch.Tensor) -> float:
    """Gini coefficient of a load vector: 0 = perfectly uniform, → 1 = all load on one expert."""
    x = counts.double().flatten()
    total = x.sum()
    if x.numel() == 0 or total <= 0:
        return 0.0
    return float((x[:, None] - x[None, :]).abs().sum() / (2 * x.numel() * total))


def normalized_entropy(counts: torch.Tensor) -> float:
    """Entropy of ``u = counts / Σ counts`` divided by log(E): 1 = uniform, 0 = one expert."""
    x = counts.double().flatten()
    if x.numel() <= 1 or x.sum() <= 0:
        return 0.0
    u = x / x.sum()
    h = -(u[u > 0] * u[u > 0].log()).sum()
    return float(h / math.log(x.numel()))


def drift(previous: torch.Tensor, current: torch.Tensor) -> float:
    """L1 distance between two normalised count vectors (consecutive logging intervals)."""
    p, c = previous.double(), current.double()
    if p.sum() <= 0 or c.sum() <= 0:
        return float("nan")
    return float((p / p.sum() - c / c.sum()).abs().sum())


class RoutingStats:
    """Per-unit fp32 running sums of router probabilities, hard counts and token counts."""

    def __init__(self):
        self.importance: dict = {}
        self.counts: dict = {}
        self.tokens: dict = {}

    def update(self, unit, probs: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one routing output: ``probs (N, E)`` full softmax, ``experts (N, K)`` chosen ids,
        ``mask (N,)`` 1 for tokens that count (None = all)."""
        probs = probs.detach().float()
        E = probs.shape[-1]
        m = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask.reshape(-1).to(probs.device).float()
        imp = (probs * m[:, None]).sum(0).cpu()
        hard = torch.zeros(E, device=probs.device).scatter_add_(
            0, experts.reshape(-1), m.repeat_interleave(experts.shape[-1])).cpu()
        self.importance[unit] = self.importance.get(unit, torch.zeros(E)) + imp
        self.counts[unit] = self.counts.get(unit, torch.zeros(E)) + hard
        self.tokens[unit] = self.tokens.get(unit, 0.0) + float(m.sum())

    def mean_importance(self, unit) -> torch.Tensor:
        """EPnG's expert importance p̄ for ``unit`` (zeros if nothing was seen)."""
        t = self.tokens.get(unit, 0.0)
        return self.importance[unit] / t if t > 0 else torch.zeros_like(self.importance.get(unit, torch.zeros(0)))

    def decay(self, factor: float) -> None:
        for unit in self.importance:
            self.importance[unit] = self.importance[unit] * factor
            self.counts[unit] = self.counts[unit] * factor
            self.tokens[unit] = self.tokens[unit] * factor

    def state_dict(self) -> dict:
        return {"importance": {str(k): v.clone() for k, v in self.importance.items()},
                "counts": {str(k): v.clone() for k, v in self.counts.items()},
                "tokens": {str(k): v for k, v in self.tokens.items()},
                "int_keys": [isinstance(k, int) for k in self.importance]}

    def load_state_dict(self, state: dict) -> None:
        keys = list(state["importance"])
        convert = {k: (int(k) if is_int else k) for k, is_int in zip(keys, state["int_keys"])}
        self.importance = {convert[k]: v.clone() for k, v in state["importance"].items()}
        self.counts = {convert[k]: v.clone() for k, v in state["counts"].items()}
        self.tokens = {convert[k]: v for k, v in state["tokens"].items()}
