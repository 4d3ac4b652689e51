"""``PrunableLoRAMoE``: a mixture of LoRA experts behind a trainable top-k router on a frozen linear
(DMEP's module, paper §III).

    y = W0 x + b + s · Σ_{i ∈ topk(x)} g_i(x) · B_i A_i x,    g = softmax(W_g x) over the module's experts

renormalised over the chosen k (a switch, ``renormalize``). Shape legend: N tokens, E experts of this
module, K top-k, r rank; ``lora_A [E, r, in]``, ``lora_B [E, out, r]``, ``router.weight [E, in]``.

While ``lb_enabled``, a training forward computes the module's load-balancing loss ``E · Σ_i f_i · P_i``
(f_i: fraction of real tokens whose top-k includes i; P_i: mean router probability; ``routing.LoadBalancingLoss``)
over the tokens of ``token_mask`` and keeps it, with its routing (``routing.routing_modules``): the model returns the
routes as ``out.adapter_router`` and the summed losses as ``out.adapter_aux_loss``. Hard counts and every
other statistic are kept by ``stats.RoutingStats`` from those routes, not by the module.
``prune_experts(keep)`` slices A, B and the router rows physically, with their optimizer state;
``expert_ids`` remembers the original index of each survivor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import optim
from .base import Adapter, AdapterError, on_meta
from .lora import check_scaling, kaiming_rows, plain_linear
from ..model.moe import Dispatch, _compute_dtype, grouped_linear
from ..model.routing import LoadBalancingLoss, RouterOutput


class PrunableLoRAMoE(Adapter):
    kind = "lora_moe"
    routes_tokens = True  # see routing.routing_modules
    base_type = nn.Linear
    saves_input = True
    required = ("expert_ids", "top_k", "rank", "alpha", "renormalize", "lb_enabled")
    mergeable = False  # its router picks experts per token: there is no single weight to fold into

    def __init__(self, base: nn.Linear, num_experts: int, top_k: int, rank: int, alpha: float,
                 renormalize: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        if num_experts <= 0 or rank <= 0 or top_k <= 0:
            raise ValueError(f"LoRA-MoE needs positive num_experts, top_k and rank; got {num_experts}, {top_k}, {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.top_k = min(top_k, num_experts)
        self.renormalize = renormalize
        device = base.weight.device
        self.router = nn.Linear(self.in_features, num_experts, bias=False, device=device)
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, rank, device=device))
        # the original index of each surviving expert: layout (host metadata, like the ranks of expert LoRA),
        # not a buffer: no device sync to read it, and a meta-device build keeps it through to_empty
        self.expert_ids = torch.arange(num_experts)
        self.lb_enabled = True
        self.implementation = "auto"
        # routing protocol (``routing.routing_modules``): the model sets token_mask before a forward and reads
        # last_route (this forward's routing) and balancing (its load-balancing pool, training only) after it
        self.token_mask: torch.Tensor | None = None
        self.last_route: RouterOutput | None = None
        self.balancing: LoadBalancingLoss | None = None
        if not on_meta(base.weight):
            self.reset_adapter_parameters(generator)

    @torch.no_grad()
    def reset_adapter_parameters(self, generator: torch.Generator | None = None) -> None:
        """Router rows and A Kaiming-uniform (router first, then expert by expert), B zero."""
        E = self.num_experts
        self.router.weight.copy_(kaiming_rows(E, self.in_features, generator))
        self.lora_A.copy_(torch.stack([kaiming_rows(self.rank, self.in_features, generator) for _ in range(E)]))
        self.lora_B.zero_()

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.router.weight, self.lora_A, self.lora_B]

    def num_adapter_parameters(self) -> int:
        return self.num_experts * (self.rank * (self.in_features + self.out_features) + self.in_features)

    @classmethod
    def summary(cls, named: dict[str, Adapter]) -> list[str]:
        m0 = next(iter(named.values()))
        return [f"LoRA-MoE (rank {m0.rank}, scaling {m0.scaling:g}, renormalize={m0.renormalize})",
                f"{'module':<40}  {'experts':>7}  {'top_k':>5}  {'params':>10}  surviving (original ids)",
                *(f"{name:<40}  {m.num_experts:>7}  {m.top_k:>5}  {m.num_adapter_parameters():>10,}  "
                  f"{m.expert_ids.tolist()}" for name, m in named.items())]

    def saved_bytes(self, rows: int, elt: int) -> int:
        """The router's fp32 probabilities and top-k (ids, weights, sort order), and per routed row (rows · k)
        the gathered input, ``A x`` and ``B A x`` at ``elt`` bytes plus its int64 position."""
        k, routed = self.top_k, rows * self.top_k
        return (rows * (self.num_experts * 4 + k * 12)
                + routed * (self.in_features + self.rank + self.out_features) * elt + routed * 8)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.expert_ids.tolist()}, "
                f"top_k={self.top_k}, rank={self.rank}, scaling={self.scaling:g}, renormalize={self.renormalize}")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (N, in)`` → fp32 probs ``(N, E)``, chosen weights ``(N, K)``, chosen experts ``(N, K)``."""
        r = self._route(x)
        return r.probs, r.weights, r.experts

    def _route(self, x: torch.Tensor) -> RouterOutput:
        dtype = _compute_dtype(x, self.router.weight)  # a bf16 base without autocast: bf16 like the input
        logits = F.linear(x.to(dtype), self.router.weight.to(dtype))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(None, logits, probs, experts, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        xf = x.reshape(-1, self.in_features)  # (N, in)
        route = self._route(xf)
        dispatch = Dispatch.build(route.experts, self.num_experts, self.implementation)
        dtype = _compute_dtype(x, self.lora_A)
        h = grouped_linear(dispatch.gather(xf).to(dtype), self.lora_A.to(dtype), dispatch.groups)  # (R, r)
        ys = grouped_linear(h, self.lora_B.to(dtype), dispatch.groups)  # (R, out)
        delta = dispatch.combine(ys, route.weights)  # (N, out)
        y = y + (self.scaling * delta).view(*x.shape[:-1], self.out_features).to(y.dtype)
        # computed in every training forward, also when activation checkpointing recomputes this one: the
        # recomputation must run the same operations as the forward it replays
        self.last_route, self.balancing = route, None
        if self.lb_enabled and self.training:
            self.balancing = LoadBalancingLoss(self.num_experts, self.top_k, self.token_mask)
            self.balancing.add_routing(route.probs, route.experts)
        return y

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """This module's load-balancing loss in the last training forward (in the graph), None without one."""
        return None if self.balancing is None else self.balancing.value()

    def check_prune(self, keep) -> torch.Tensor:
        """``keep`` as sorted unique positions; raise, changing nothing, if it is not a valid survivor set."""
        keep = torch.as_tensor(sorted({int(k) for k in keep}), dtype=torch.long)
        if len(keep) == 0 or keep[0] < 0 or keep[-1] >= self.num_experts:
            raise ValueError(f"prune_experts: keep must be non-empty indices in 0..{self.num_experts - 1}, "
                             f"got {keep.tolist()}")
        return keep

    def prune_experts(self, keep, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep only experts at positions ``keep`` (current indices): A, B, router rows and their
        optimizer state are sliced; ``top_k`` is clamped to the survivors."""
        keep = self.check_prune(keep)
        self.lora_A = optim.slice_param(optimizer, self.lora_A, keep, 0)
        self.lora_B = optim.slice_param(optimizer, self.lora_B, keep, 0)
        self.router.weight = optim.slice_param(optimizer, self.router.weight, keep, 0)
        self.expert_ids = self.expert_ids[keep]
        self.top_k = min(self.top_k, len(keep))

    # --- protocol (adapters/base.py) -------------------------------------------------------------------
    def spec(self) -> dict:
        return {"expert_ids": self.expert_ids.tolist(), "top_k": self.top_k, "rank": self.rank, "alpha": self.alpha,
                "scaling": self.scaling, "renormalize": self.renormalize, "lb_enabled": self.lb_enabled}

    @classmethod
    def from_spec(cls, base, spec, generator=None) -> PrunableLoRAMoE:
        m = cls(base, len(spec["expert_ids"]), spec["top_k"], spec["rank"], spec["alpha"], spec["renormalize"],
                generator)
        m.expert_ids = torch.tensor(spec["expert_ids"], dtype=torch.long)
        m.lb_enabled = spec["lb_enabled"]
        return m

    @classmethod
    def check_spec(cls, base, spec) -> str | None:
        if not spec["expert_ids"]:
            return "keeps no expert"
        return check_scaling(spec)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "router.weight": self.router.weight}

    @classmethod
    def expected_shapes(cls, base, spec) -> dict[str, tuple[int, ...]]:
        E, r = len(spec["expert_ids"]), spec["rank"]
        return {"lora_A": (E, r, base.in_features), "lora_B": (E, base.out_features, r),
                "router.weight": (E, base.in_features)}

    def merged_weight(self) -> torch.Tensor:
        raise AdapterError("a LoRA-MoE cannot be merged into dense weights: its router chooses experts per token; "
                           "save it in minimoe's native format with minimoe.save_adapter(model, dir) instead")

    def base_module(self) -> nn.Linear:
        return plain_linear(self.weight, self.bias)
