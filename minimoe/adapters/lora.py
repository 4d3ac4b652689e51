"""``LoRALinear`` — LoRA on a dense linear — and the initialisations every LoRA kind shares.

Adapters own the frozen base weight under the key the plain layer uses (``q_proj.weight``), so base
checkpoints load without remapping. Adapter weights are fp32 (master weights); compute runs in the
activations' dtype. Scaling ``alpha / r`` is fixed when the adapter is created and never changes with
rank, so growing (``expert_lora.ResizableLoRAExpert``) never rescales what was learned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, on_meta
from ..model.moe import _compute_dtype


def kaiming_rows(rows: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(rows, in)`` fp32 rows drawn like ``nn.Linear``'s / PEFT's ``lora_A`` init:
    Kaiming-uniform with a=√5, i.e. U(-1/√in, 1/√in)."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rows, in_features, generator=generator) * 2 - 1) * bound


def orthogonal_rows(new: torch.Tensor, existing: torch.Tensor) -> torch.Tensor:
    """Project ``new (n, in)`` onto the orthogonal complement of the row space of ``existing (r, in)``
    (fp32 QR), keeping each new row's norm (its Kaiming scale)."""
    if existing.shape[0] == 0:
        return new
    q, _ = torch.linalg.qr(existing.double().T)  # (in, r) orthonormal basis of the existing rows
    projected = new.double() - (new.double() @ q) @ q.T
    scale = new.double().norm(dim=1, keepdim=True) / projected.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (projected * scale).float()


def check_scaling(spec: dict) -> str | None:
    """A recorded ``scaling`` that is not ``alpha / rank`` (an edited file) is refused, not silently used."""
    if "scaling" in spec and not math.isclose(spec["scaling"], spec["alpha"] / spec["rank"], rel_tol=1e-6):
        return f"scaling {spec['scaling']} is not alpha / rank = {spec['alpha']} / {spec['rank']}"
    return None


def plain_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` around existing tensors (built on meta: nothing is allocated or initialised)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight, linear.bias = weight, bias
    return linear


class LoRALinear(Adapter):
    """``y = W x + b + s · B A x`` with W, b frozen; A ``(r, in)`` Kaiming, B ``(out, r)`` zero, s = α/r."""

    kind = "lora"
    saves_input = True
    base_type = nn.Linear
    required = ("rank", "alpha")

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=device))
        if not on_meta(base.weight):
            self.reset_adapter_parameters(generator)

    @torch.no_grad()
    def reset_adapter_parameters(self, generator: torch.Generator | None = None) -> None:
        self.lora_A.copy_(kaiming_rows(self.rank, self.in_features, generator))
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        dtype = _compute_dtype(x, self.lora_A)
        delta = F.linear(F.linear(x.to(dtype), self.lora_A.to(dtype)), self.lora_B.to(dtype))
        return y + self.scaling * delta.to(y.dtype)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def num_adapter_parameters(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @classmethod
    def summary(cls, named: dict[str, Adapter]) -> list[str]:
        return [f"{'LoRA linear':<40}  {'rank':>5}  {'params':>10}",
                *(f"{name:<40}  {m.rank:>5}  {m.num_adapter_parameters():>10,}" for name, m in named.items())]

    def saved_bytes(self, rows: int, elt: int) -> int:
        """A x, for B's gradient."""
        return rows * self.rank * elt

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"

    # --- protocol (adapters/base.py) -------------------------------------------------------------------
    def spec(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "scaling": self.scaling}

    @classmethod
    def from_spec(cls, base, spec, generator=None) -> LoRALinear:
        return cls(base, spec["rank"], spec["alpha"], generator)

    @classmethod
    def check_spec(cls, base, spec) -> str | None:
        return check_scaling(spec)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    @classmethod
    def expected_shapes(cls, base, spec) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (spec["rank"], base.in_features), "lora_B": (base.out_features, spec["rank"])}

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return (self.weight.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)

    def base_module(self) -> nn.Linear:
        return plain_linear(self.weight, self.bias)
