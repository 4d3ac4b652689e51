"""``SelectedExperts``: ESFT's adapter — only the selected experts of one projection train, in full.

The selected experts' weights live in their own parameter ``trained [n_sel, out, in]``; the frozen
stacked ``weight [E, out, in]`` stays under the plain key. The forward builds the layer's stacked weight
with them in place (one ``index_copy``: it costs one copy of that layer's expert weights in activation
memory — use activation checkpointing on large models). Which experts are selected is the ESFT policy's
decision (``policies/esft.py``); this module only carries it out.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, on_meta
from ..model.moe import Groups, StackedLinear, grouped_linear


class SelectedExperts(Adapter):
    """Stacked experts where only ``selected`` train (as ``trained``); the rest is the frozen ``weight``."""

    kind = "esft"
    base_type = StackedLinear
    base_keys = ("weight",)
    required = ("selected",)
    saves_input = True

    def __init__(self, base: StackedLinear, selected: list[int]):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = base.num_experts, base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.selected = torch.tensor(selected, dtype=torch.long)  # layout: host metadata, not a buffer
        self.trained = nn.Parameter(torch.empty(len(selected), self.out_features, self.in_features,
                                                dtype=base.weight.dtype, device=base.weight.device))
        if not on_meta(base.weight):
            self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self, generator: torch.Generator | None = None) -> None:
        """The selected experts start from their base weights."""
        self.trained.copy_(self.weight[self.selected.to(self.weight.device)])

    def merged_weight(self) -> torch.Tensor:
        return self.weight.index_copy(0, self.selected.to(self.weight.device), self.trained)

    def forward(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        return grouped_linear(x, self.merged_weight(), groups)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.trained]

    def saved_bytes(self, rows: int, elt: int) -> int:
        """The stacked weight its forward assembles (the frozen and the trained experts), kept for the backward."""
        return self.num_experts * self.out_features * self.in_features * self.weight.element_size()

    @classmethod
    def summary(cls, named: dict[str, Adapter]) -> list[str]:
        return [f"{'ESFT: experts trained in full':<40}  {'params':>10}  selected experts",
                *(f"{name:<40}  {m.num_adapter_parameters():>10,}  {m.selected.tolist()}" for name, m in named.items())]

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, " \
               f"selected={self.selected.tolist()}"

    # --- protocol (adapters/base.py) -------------------------------------------------------------------
    def spec(self) -> dict:
        return {"selected": self.selected.tolist()}

    @classmethod
    def from_spec(cls, base, spec, generator=None) -> SelectedExperts:
        return cls(base, spec["selected"])

    @classmethod
    def check_spec(cls, base, spec) -> str | None:
        if any(not 0 <= e < base.num_experts for e in spec["selected"]):
            return f"selects experts outside 0..{base.num_experts - 1}"
        return None

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"trained": self.trained}

    @classmethod
    def expected_shapes(cls, base, spec) -> dict[str, tuple[int, ...]]:
        return {"trained": (len(spec["selected"]), base.out_features, base.in_features)}

    def base_module(self) -> StackedLinear:
        with torch.device("meta"):
            base = StackedLinear(self.num_experts, self.in_features, self.out_features)
        base.weight = self.weight
        return base
