"""Sparse MoE block: top-k router, stacked experts, sort-based token dispatch, load-balancing loss.

Shape legend:
    N  tokens in the batch (B·T flattened)        H  hidden size
    E  experts in the layer                        I  expert width (moe_intermediate_size)
    K  experts chosen per token (top-k)            R  routed rows = N·K, sorted by expert id

Experts of a layer are stacked ``[E, out, in]`` so one grouped matmul serves all of them. Tokens
are dispatched by a stable sort on expert id: rows of one expert are contiguous, and ``offsets``
(cumulative row counts, int32) delimit the groups. ``torch.nn.functional.grouped_mm`` runs the
groups in one kernel where device, dtype and alignment allow; a plain per-expert loop is kept as the
reference path (it needs the row counts on the host, the grouped path does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .routing import RouterOutput

IMPLEMENTATIONS = ("auto", "grouped_mm", "loop")


@dataclass
class Groups:
    """Rows of a sorted ``[R, ·]`` activation grouped by expert: ``counts`` (E,) and ``offsets`` (E,)."""

    counts: torch.Tensor  # (E,) int32, rows per expert
    offsets: torch.Tensor  # (E,) int32, cumulative counts (end of each group), as grouped_mm wants
    implementation: str = "auto"

    @classmethod
    def from_counts(cls, counts: torch.Tensor, implementation: str = "auto") -> "Groups":
        counts = counts.to(torch.int32)
        return cls(counts, torch.cumsum(counts, 0, dtype=torch.int32), implementation)

    def sizes(self) -> list[int]:
        """Rows per expert on the host (a device sync: loop path only)."""
        return self.counts.tolist()


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` can run ``x (R, in) @ w (E, out, in)ᵀ`` on this device and dtype."""
    if not hasattr(F, "grouped_mm"):
        return False
    dtype = _compute_dtype(x, w)
    if x.device.type == "cuda":
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    # rows must be 16-byte aligned: inner dims a multiple of 16 bytes
    size = torch.empty((), dtype=dtype).element_size()
    return (w.shape[-1] * size) % 16 == 0 and (w.shape[-2] * size) % 16 == 0


def use_grouped_mm(x: torch.Tensor, weight: torch.Tensor, implementation: str) -> bool:
    return implementation == "grouped_mm" or (implementation == "auto" and grouped_mm_supported(x, weight))


# --- grouped_mm as an opaque op for torch.compile ---------------------------------------------------------
# Traced by torch.compile, ``F.grouped_mm`` runs its meta function, which accepts bf16 only ("Expected inputs
# of BF16 type") although the CPU kernel runs fp32. Under compile, other dtypes go through this custom op: its
# fake function gives the output's shape, its backward is two more grouped matmuls (what autograd computes
# for F.grouped_mm: bit-identical on CPU), and the kernel is the eager one. Eager code never uses it.
@torch.library.custom_op("minimoe::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a (R, in)`` rows sorted by group, ``b (G, in, out)`` → ``(R, out)``; or, the weight gradient,
    ``a (in, R)``, ``b (R, out)`` grouped along R → ``(G, in, out)``. ``offs (G,)``: ends of the groups."""
    return F.grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a, b, offs):
    if b.dim() == 2:
        return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])
    return a.new_empty(a.shape[0], b.shape[-1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    if b.dim() == 2:
        raise RuntimeError("minimoe::grouped_mm: no double backward")
    ga = _grouped_mm_op(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None  # (R, in)
    gb = _grouped_mm_op(a.t(), grad, offs) if ctx.needs_input_grad[1] else None  # (G, in, out): aᵀ_g · grad_g
    return ga, gb, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling() and a.dtype != torch.bfloat16:
        return _grouped_mm_op(a, b, offs)
    return F.grouped_mm(a, b, offs=offs)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, groups: Groups) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ weight[e]ᵀ`` for every expert e.

    Args:
        x: ``(R, in)`` rows sorted by expert.
        weight: ``(E, out, in)`` stacked expert weights.
        groups: row counts/offsets per expert.
    Returns:
        ``(R, out)``.
    """
    dtype = _compute_dtype(x, weight)
    if use_grouped_mm(x, weight, groups.implementation):
        return _grouped_mm(x.to(dtype), weight.to(dtype).transpose(-2, -1), groups.offsets)
    # Reference path: one matmul per expert (host sync for the sizes).
    chunks = x.split(groups.sizes())
    return torch.cat([F.linear(xe.to(dtype), we.to(dtype)) for xe, we in zip(chunks, weight)], dim=0)


class _Gather(torch.autograd.Function):
    """``xs = x[order // K]``: each token K times, in expert order ``(N, D) → (R, D)``. Backward undoes the
    permutation (``inverse``) and sums each token's K rows, in k order: deterministic on every device, and
    on CPU ~9× cheaper than autograd's own backward of ``x[index]`` (an accumulating ``index_put_``, 2.8 ms
    against 0.3 ms at N=1024, K=4, D=256)."""

    @staticmethod
    def forward(ctx, x, order, inverse, top_k):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse).view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None, None


@dataclass
class Dispatch:
    """Token-slots ``(token, k)`` sorted by expert, so each expert's rows are contiguous.

    ``gather`` lays tokens out in expert order ``(N, D) → (R, D)``; ``combine`` brings expert outputs
    back to token order and sums the K choices weighted by the router ``(R, D) → (N, D)``
    (deterministic: no atomics). No host sync on the way.
    """

    order: torch.Tensor  # (R,) slot ids sorted by expert
    inverse: torch.Tensor  # (R,) position of each slot in ``order`` (order[inverse] = arange)
    groups: Groups
    top_k: int

    @classmethod
    def build(cls, experts: torch.Tensor, num_experts: int, implementation: str = "auto") -> "Dispatch":
        flat = experts.reshape(-1)  # (R,)
        order = torch.argsort(flat, stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
        # counts without a host sync (bincount's output size would need one on CUDA)
        counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        return cls(order, inverse, Groups.from_counts(counts, implementation), experts.shape[-1])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(x, self.order, self.inverse, self.top_k)

    def combine(self, ys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = ys.index_select(0, self.inverse)  # (R, D) back in slot order: a permutation, exact both ways
        N = weights.shape[0]
        return (out.view(N, self.top_k, -1) * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)


class StackedLinear(nn.Module):
    """Bias-free linear maps of E experts stacked as one ``weight [E, out, in]``.

    Keeping each projection a module (``experts.gate_proj.weight``) mirrors the Hub key
    ``experts.{e}.gate_proj.weight`` minus the expert index, so adapters can wrap a projection the
    way ``LoRALinear`` wraps an ``nn.Linear``.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def forward(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        return grouped_linear(x, self.weight, groups)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}"


class Experts(nn.Module):
    """E SwiGLU experts: ``y = down_e(silu(gate_e x) * up_e x)`` on expert-sorted rows."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = StackedLinear(num_experts, hidden_size, intermediate_size)
        self.up_proj = StackedLinear(num_experts, hidden_size, intermediate_size)
        self.down_proj = StackedLinear(num_experts, intermediate_size, hidden_size)
        self.implementation = "auto"

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Args: x ``(N, H)``, experts ``(N, K)`` chosen ids, weights ``(N, K)``. Returns ``(N, H)``."""
        dispatch = Dispatch.build(experts, self.num_experts, self.implementation)
        groups = dispatch.groups
        xs = dispatch.gather(x)  # (R, H) rows in expert order
        h = F.silu(self.gate_proj(xs, groups)) * self.up_proj(xs, groups)  # (R, I)
        return dispatch.combine(self.down_proj(h, groups), weights)  # (N, H)


class TopKRouter(nn.Module):
    """Softmax over all experts in fp32, top-k, optional renormalisation over the chosen k."""

    def __init__(self, num_experts: int, hidden_size: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """The routing of ``x (N, H)``; its unit (the layer) is set by the model, outside the block, so that
        identical blocks share one compiled graph (``torch.compile`` specialises on a module's ints)."""
        logits = F.linear(x, self.weight)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)  # (N, K)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return RouterOutput(None, logits, probs, idx, w.to(logits.dtype))


class MLP(nn.Module):
    """Dense SwiGLU MLP (Qwen3, ``mlp_only_layers``, the Qwen1.5-MoE shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ Qwen1.5-MoE's gated shared expert). Returns output and routing."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        H = config.hidden_size
        self.gate = TopKRouter(config.num_experts, H, config.num_experts_per_tok, config.norm_topk_prob)
        self.experts = Experts(config.num_experts, H, config.moe_intermediate_size)
        self.shared_expert = self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(H, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        route = self.gate(x)
        y = self.experts(x, route.experts, route.weights)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.view(shape), route
