"""What one forward says about routing: the records every statistic and every load-balancing loss is read from.

Two kinds of router produce a ``RouterOutput``:

* the router of an MoE layer (``unit`` = the decoder-layer index), returned by the model as ``out.router``;
* the router of an adapter that routes tokens itself (a LoRA-MoE, ``unit`` = its module path), read by the
  model after the forward (``routing_modules``) and returned as ``out.adapter_router``.

Which tokens count (padding and, in training, prompt tokens masked) is the forward's *token mask*, which
the model hands to those adapters before the forward. Accumulating over micro-batches and
steps, reducing across processes and deciding are not done here but in ``stats.RoutingStats``, which
reads these records. The load-balancing losses are computed per forward, in the graph, by
``LoadBalancingLoss`` from the same quantities (``f_i``: share of tokens whose top-k holds i; ``P_i``: mean
router probability of i).

Shape legend: N tokens of the forward (B·T flattened), E experts of the router, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RouterOutput:
    """The routing of one router for the batch (tokens flattened, ``N = B·T``).

    Attributes:
        unit: decoder-layer index (an MoE layer's router) or module path (a LoRA-MoE's router); the key of
            the unit's statistics.
        logits: ``(N, E)`` raw router logits (compute dtype, in the graph).
        probs: ``(N, E)`` fp32 softmax over all experts.
        experts: ``(N, K)`` chosen expert ids.
        weights: ``(N, K)`` routing weights applied to the chosen experts.
    """

    unit: int | str | None
    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor

    @property
    def layer(self) -> int | str | None:
        """The unit (the name it had when only MoE layers routed)."""
        return self.unit


# --- modules that route tokens themselves ---------------------------------------------------------------
def routing_modules(module: nn.Module) -> list[nn.Module]:
    """The modules inside ``module`` that route tokens themselves (``routes_tokens``: a LoRA-MoE).

    Their protocol, plain attributes rather than context variables so that ``torch.compile`` traces them
    without a graph break: before each forward the model sets ``token_mask`` (flattened ``(N,)`` 0/1, which
    tokens count for the load-balancing loss; None = all); the module's forward sets ``last_route`` (its
    ``RouterOutput``) and ``balancing`` (its ``LoadBalancingLoss`` in training, else None); the model reads
    both after the forward. Statistics are read by the model's own forward only, so the recomputation of a
    forward inside backward (activation checkpointing) is never counted twice.
    """
    return [m for m in module.modules() if getattr(m, "routes_tokens", False)]


# --- load balancing ---------------------------------------------------------------------------------
class LoadBalancingLoss:
    """``aux = E · Σ_e f_e · P̄_e``, streamed over one or several routers of the same width E.

    ``f_e``: fraction of (real) token-slots routed to e (Σ_e f_e = K); ``P̄_e``: mean router probability of
    e; both pooled over what was added. The model's MoE loss adds every MoE layer through ``add(logits)``:
    transformers' ``load_balancing_loss_func`` (softmax in the logits' dtype, top-k recomputed from it,
    ``norm_topk_prob`` ignored). A LoRA-MoE adds its own routing (``add_routing``) and is its own pool
    (DMEP's per-module loss).
    """

    def __init__(self, num_experts: int, top_k: int, mask: torch.Tensor | None):
        self.E, self.K = num_experts, top_k
        self.mask = None if mask is None else mask.reshape(-1, 1).float()  # (N, 1)
        self.slots = self.probs = self.tokens = 0

    def add(self, logits: torch.Tensor) -> None:
        probs = torch.softmax(logits, dim=-1)  # (N, E), in the logits' dtype as transformers does
        self.add_routing(probs, torch.topk(probs, self.K, dim=-1).indices)

    def add_routing(self, probs: torch.Tensor, experts: torch.Tensor) -> None:
        """``probs (N, E)`` router probabilities (in the graph), ``experts (N, K)`` the chosen ones."""
        K = experts.shape[-1]
        m = torch.ones(probs.shape[0], 1, device=probs.device) if self.mask is None else self.mask.to(probs.device)
        slots = torch.zeros(self.E, device=probs.device).scatter_add_(
            0, experts.reshape(-1), m.expand(-1, K).reshape(-1))
        self.slots = self.slots + slots
        self.probs = self.probs + (probs.float() * m).sum(0)
        self.tokens = self.tokens + m.sum()

    def value(self, slots: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The loss; with ``slots``/``tokens`` summed over several processes, this process's share of the
        loss over all of them (its own probabilities, the global f and token count): the shares add up to
        the loss of the whole batch, and so do their gradients."""
        slots = self.slots if slots is None else slots
        tokens = (self.tokens if tokens is None else tokens).clamp_min(1.0)  # no real token: 0, not NaN
        return self.E * torch.sum((slots / tokens) * (self.probs / tokens))


def combined_balancing_loss(pools: list[LoadBalancingLoss], reduce: str = "mean", all_reduce=None) -> torch.Tensor:
    """Several routers' load-balancing losses as one (DMEP's LB term before its coefficient): each pool's loss
    with f and the token count summed over the processes (``all_reduce``: a sum across processes; None: one
    process), this process's share of it (``LoadBalancingLoss.value``), then the ``mean`` over the pools (one
    pool's loss weighs the coefficient, whatever their number) or their ``sum``."""
    counts = torch.cat([torch.cat([lb.slots, lb.tokens.reshape(1)]) for lb in pools]).detach()
    if all_reduce is not None:
        counts = all_reduce(counts)
    shares, offset = [], 0
    for lb in pools:
        E = lb.slots.numel()
        shares.append(lb.value(counts[offset:offset + E], counts[offset + E]))
        offset += E + 1
    shares = torch.stack(shares)
    return shares.sum() if reduce == "sum" else shares.mean()
