"""Routing statistics: the one object every policy reads its decisions from.

``RoutingStats`` keeps, per *unit* (an MoE layer's router, named by its decoder-layer index: ``layers()``; a
LoRA-MoE's, named by its module path: ``modules()``), running sums over the real tokens of training forwards,
on the model's device (no host sync while training):

* ``importance`` — Σ of the full softmax router probabilities (EPnG's p̄ = importance / tokens);
* ``counts`` — hard top-k choices per expert (DMEP's utilisation; ESFT's token-selection score);
* ``gate`` — Σ of the routing weights given to chosen experts (ESFT's gate score);
* ``tokens`` — how many tokens contributed.

It is fed the routes of a forward (``observe(out, mask)``: ``out.router`` and ``out.adapter_router``), at
micro-batch granularity. ``sync()`` is the one place the sums are reduced across processes: with several
processes, updates wait in a local buffer until ``sync()`` all-reduces them (one collective, every rank
must call it at the same point: the trainer does, before every decision point); in one process it does
nothing. ``snapshot()`` returns host copies of everything a decision needs. Decide only at optimizer-step
boundaries. ``decay(λ)`` multiplies all sums by λ (EPnG: "decay gate statistics" after each event), so a
mean keeps its value but history weighs λ against new tokens; ``keep(unit, index)`` follows a pruning of a
unit's experts. Also here: Gini, normalised entropy and drift of a count vector (DMEP §III).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

FIELDS = ("importance", "counts", "gate")


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


@dataclass
class UnitSnapshot:
    """Host copies of one unit's sums (fp32 vectors of length E, tokens a float)."""

    importance: torch.Tensor
    counts: torch.Tensor
    gate: torch.Tensor
    tokens: float

    @property
    def mean_importance(self) -> torch.Tensor:
        """EPnG's p̄: mean full-softmax probability per expert (zeros if no token was seen)."""
        return self.importance / self.tokens if self.tokens > 0 else torch.zeros_like(self.importance)


class RoutingStats:
    """Per-unit running sums of router probabilities, hard counts, gate weights and tokens (see module doc)."""

    def __init__(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``all_reduce``: with several processes, a function that sums a tensor over them in place (the
        trainer's ``World.all_reduce``); updates then wait for ``sync()``. None: one process."""
        self.all_reduce = all_reduce
        self.importance: dict = {}  # unit -> (E,) fp32, reduced over processes up to the last sync()
        self.counts: dict = {}
        self.gate: dict = {}
        self.tokens: dict = {}  # unit -> () fp64
        self._pending: dict = {}  # several processes: unit -> [importance, counts, gate, tokens] since sync()

    # --- feeding ----------------------------------------------------------------------------------
    def update(self, unit, probs: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor | None = None,
               weights: torch.Tensor | None = None) -> None:
        """Add one routing: ``probs (N, E)`` full softmax, ``experts (N, K)`` chosen ids, ``mask (N,)`` 1 for
        tokens that count (None = all), ``weights (N, K)`` the chosen experts' routing weights."""
        probs = probs.detach().float()
        E, device = probs.shape[-1], probs.device
        m = torch.ones(probs.shape[0], device=device) if mask is None else mask.reshape(-1).to(device).float()
        flat = experts.reshape(-1)
        imp = (probs * m[:, None]).sum(0)
        hard = torch.zeros(E, device=device).scatter_add_(0, flat, m.repeat_interleave(experts.shape[-1]))
        gate = torch.zeros(E, device=device)
        if weights is not None:
            gate.scatter_add_(0, flat, (weights.detach().float() * m[:, None]).reshape(-1))
        add = [imp, hard, gate, m.sum().double()]
        if self.all_reduce is not None:
            pending = self._pending.get(unit)
            self._pending[unit] = add if pending is None else [a + b for a, b in zip(pending, add)]
        else:
            self._add(unit, add)

    def observe(self, out, mask: torch.Tensor | None = None) -> None:
        """Add every route of a forward (``out.router`` and ``out.adapter_router``); ``mask (B, T)``."""
        mask = None if mask is None else mask.reshape(-1)
        for route in [*(out.router or []), *(getattr(out, "adapter_router", None) or [])]:
            self.update(route.unit, route.probs, route.experts, mask, route.weights)

    def _add(self, unit, add: list[torch.Tensor]) -> None:
        E, device = add[0].shape[0], add[0].device
        for name, value in zip(FIELDS, add):
            table = getattr(self, name)
            table[unit] = table[unit].to(device) + value if unit in table else torch.zeros(E, device=device) + value
        self.tokens[unit] = self.tokens[unit].to(device) + add[3] if unit in self.tokens else add[3]

    def sync(self) -> None:
        """All-reduce (sum) what every process added since the last sync and fold it into the totals: a
        collective that every rank calls at the same point. Nothing to do in one process."""
        if not self._pending:
            return
        units = sorted(self._pending, key=lambda u: (isinstance(u, str), str(u)))
        parts = [v for u in units for v in self._pending[u]]
        flat = torch.cat([p.double().reshape(-1) for p in parts])
        self.all_reduce(flat)
        offset = 0
        for unit in units:
            reduced = []
            for p in self._pending[unit]:
                reduced.append(flat[offset:offset + p.numel()].view(p.shape).to(p.dtype))
                offset += p.numel()
            self._add(unit, reduced)
        self._pending = {}

    # --- reading and changing -----------------------------------------------------------------------
    def units(self) -> list:
        return list(self.importance)

    def layers(self) -> list[int]:
        """The units of MoE layers' routers (decoder-layer indices, in order) that have seen tokens."""
        return sorted(u for u in self.importance if isinstance(u, int))

    def modules(self) -> list[str]:
        """The units of LoRA-MoE modules' routers (module paths) that have seen tokens."""
        return [u for u in self.importance if isinstance(u, str)]

    def snapshot(self, units=None) -> dict:
        """``{unit: UnitSnapshot}``: host copies of the sums of ``units`` (default: every unit; one not seen
        yet is left out), as of the last ``sync()``."""
        units = self.importance if units is None else [u for u in units if u in self.importance]
        return {u: UnitSnapshot(self.importance[u].cpu(), self.counts[u].cpu(), self.gate[u].cpu(),
                                float(self.tokens[u])) for u in units}

    def mean_importance(self, unit) -> torch.Tensor:
        """EPnG's expert importance p̄ for ``unit`` (``UnitSnapshot.mean_importance``; empty if never seen)."""
        snapshot = self.snapshot([unit])
        return snapshot[unit].mean_importance if snapshot else torch.zeros(0)

    def decay(self, factor: float) -> None:
        for unit in self.importance:
            for name in FIELDS:
                getattr(self, name)[unit] = getattr(self, name)[unit] * factor
            self.tokens[unit] = self.tokens[unit] * factor

    def keep(self, unit, index) -> None:
        """Keep only the experts at positions ``index`` of ``unit`` (after its experts were pruned)."""
        if unit not in self.importance:
            return
        for name in FIELDS:
            table = getattr(self, name)
            table[unit] = table[unit][torch.as_tensor(index, dtype=torch.long, device=table[unit].device)]

    def state_dict(self) -> dict:
        """Host copies, in the format of state.pt (call ``sync()`` first with several processes)."""
        return {**{name: {str(k): v.detach().cpu().clone() for k, v in getattr(self, name).items()} for name in FIELDS},
                "tokens": {str(k): float(v) for k, v in self.tokens.items()},
                "int_keys": [isinstance(k, int) for k in self.importance]}

    def load_state_dict(self, state: dict) -> None:
        keys = list(state["importance"])
        convert = {k: (int(k) if is_int else k) for k, is_int in zip(keys, state["int_keys"])}
        self.importance = {convert[k]: v.clone() for k, v in state["importance"].items()}
        self.counts = {convert[k]: v.clone() for k, v in state["counts"].items()}
        # written before gate sums were kept: zeros (only ESFT's gate score reads them, before training)
        self.gate = {convert[k]: v.clone() for k, v in state.get("gate", {}).items()} or \
            {u: torch.zeros_like(v) for u, v in self.importance.items()}
        self.tokens = {convert[k]: torch.tensor(float(v), dtype=torch.float64) for k, v in state["tokens"].items()}
        self._pending = {}
