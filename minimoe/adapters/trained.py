"""``TrainedLinear``: a dense linear trained in full, as an adapter — ESFT's option to train the shared
experts (Qwen1.5-MoE's ``shared_expert``) next to the selected routed ones.

Its weight lives in its own parameter ``trained [out, in]`` (a copy of the frozen base ``weight``, which stays
under the plain key), so the adapter file, the checkpoint and the merged export carry it like any adapter's
tensors and the base checkpoint stays untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, on_meta


class TrainedLinear(Adapter):
    """``y = x · trainedᵀ (+ bias)``: the base linear's weight, trained in full; the bias stays frozen."""

    kind = "trained_linear"
    base_type = nn.Linear

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.trained = nn.Parameter(torch.empty_like(base.weight))
        if not on_meta(base.weight):
            self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self, generator: torch.Generator | None = None) -> None:
        """Training starts from the base weight."""
        self.trained.copy_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.trained.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.trained]

    def merged_weight(self) -> torch.Tensor:
        return self.trained.detach()

    @classmethod
    def summary(cls, named: dict[str, Adapter]) -> list[str]:
        return [f"{'linears trained in full':<40}  {'params':>10}",
                *(f"{name:<40}  {m.num_adapter_parameters():>10,}" for name, m in named.items())]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, trained in full"

    # --- protocol (adapters/base.py) -------------------------------------------------------------------
    def spec(self) -> dict:
        return {}

    @classmethod
    def from_spec(cls, base, spec, generator=None) -> TrainedLinear:
        return cls(base)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"trained": self.trained}

    @classmethod
    def expected_shapes(cls, base, spec) -> dict[str, tuple[int, ...]]:
        return {"trained": (base.out_features, base.in_features)}

    def base_module(self) -> nn.Linear:
        with torch.device("meta"):
            base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        base.weight, base.bias = self.weight, self.bias
        return base
