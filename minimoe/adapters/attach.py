"""Model-level adapter methods (mixed into ``CausalLM``): attach, resize, count and describe adapters.

Layer indices in the expert-LoRA methods are decoder-layer indices; module names in the LoRA-MoE
methods are paths as ``named_modules()`` prints them (``layers.0.self_attn.q_proj``). Every resize
takes an optional ``optimizer`` whose state follows the change (``optim.py``). Attaching an adapter
freezes every base weight; ``adapter_parameters()`` is what to give the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import optim
from .base import adapters_of, replace_module
from .expert_lora import ResizableLoRAExpert
from .lora import LoRALinear
from .lora_moe import PrunableLoRAMoE
from .selected import SelectedExperts
from .trained import TrainedLinear
from ..model.moe import SparseMoeBlock, StackedLinear

EXPERT_TARGETS = ("gate_proj", "up_proj", "down_proj")
# the order of the kinds' sections in adapter_summary (a kind not listed comes last)
SUMMARY_ORDER = (ResizableLoRAExpert, PrunableLoRAMoE, LoRALinear, SelectedExperts, TrainedLinear)


def _plain_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Dense linears an adapter may wrap (not routers, not the head, not already adapted)."""
    return {name: m for name, m in model.named_modules()
            if type(m) is nn.Linear and not name.endswith(("mlp.gate", "shared_expert_gate")) and name != "lm_head"}


class AdapterMixin:
    """Adapter methods of ``CausalLM``."""

    # --- attaching ---------------------------------------------------------------------------
    def _freeze_base(self) -> None:
        adapter_ids = {id(p) for m in adapters_of(self).values() for p in m.adapter_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in adapter_ids)

    def _match_linears(self, targets: Iterable[str], what: str) -> dict[str, nn.Linear]:
        targets = tuple(targets)
        linears = _plain_linears(self)
        found = {n: m for n, m in linears.items() if n.rsplit(".", 1)[-1] in targets}
        if not found:
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"{what}: targets {list(targets)} match no dense linear of this "
                             f"{self.config.model_type} model; available: {names}")
        return found

    def add_lora(self, rank: int = 8, alpha: float = 16, targets: Iterable[str] = ("q_proj", "v_proj"),
                 generator: torch.Generator | None = None) -> list[str]:
        """``LoRALinear`` on every dense linear whose name ends with a target (attention projections,
        dense MLP, the shared expert). Returns the module names."""
        found = self._match_linears(targets, "add_lora")
        for name, linear in found.items():
            replace_module(self, name, LoRALinear(linear, rank, alpha, generator))
        self._freeze_base()
        return list(found)

    def add_expert_lora(self, rank: int = 8, alpha: float = 16, targets: Iterable[str] = ("gate_proj", "up_proj"),
                        layers: Iterable[int] | None = None, generator: torch.Generator | None = None) -> list[int]:
        """``ResizableLoRAExpert`` on ``targets`` of the routed experts of every MoE layer (or ``layers``),
        every expert at ``rank``. Returns the layer indices."""
        targets = tuple(targets)
        bad = [t for t in targets if t not in EXPERT_TARGETS]
        if bad or not targets:
            raise ValueError(f"add_expert_lora: targets {list(targets)} are not expert projections; "
                             f"choose from {list(EXPERT_TARGETS)}")
        moe_layers = self.config.moe_layers
        if not moe_layers:
            raise ValueError(f"add_expert_lora: this {self.config.model_type} model has no MoE layers "
                             "(use add_lora or add_lora_moe on dense models)")
        layers = moe_layers if layers is None else [int(i) for i in layers]
        wrong = [i for i in layers if i not in moe_layers]
        if wrong:
            raise ValueError(f"add_expert_lora: layers {wrong} are not MoE layers; MoE layers: {moe_layers}")
        for i in layers:
            experts = self.layers[i].mlp.experts
            for t in targets:
                base = getattr(experts, t)
                if type(base) is not StackedLinear:
                    raise ValueError(f"add_expert_lora: layers.{i}.mlp.experts.{t} already has an adapter")
                setattr(experts, t, ResizableLoRAExpert(base, rank, alpha, generator=generator))
        self._freeze_base()
        return layers

    def add_lora_moe(self, num_experts: int = 8, top_k: int = 2, rank: int = 8, alpha: float = 16,
                     targets: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"),
                     renormalize: bool = True, generator: torch.Generator | None = None) -> list[str]:
        """``PrunableLoRAMoE`` (DMEP) on every dense linear whose name ends with a target."""
        found = self._match_linears(targets, "add_lora_moe")
        for name, linear in found.items():
            replace_module(self, name, PrunableLoRAMoE(linear, num_experts, top_k, rank, alpha, renormalize, generator))
        self._freeze_base()
        return list(found)

    # --- reading -----------------------------------------------------------------------------
    def expert_lora_modules(self) -> dict[int, dict[str, ResizableLoRAExpert]]:
        """``{layer: {target: module}}`` for every layer with expert LoRA."""
        out: dict[int, dict[str, ResizableLoRAExpert]] = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoeBlock):
                mods = {t: getattr(layer.mlp.experts, t) for t in EXPERT_TARGETS}
                mods = {t: m for t, m in mods.items() if isinstance(m, ResizableLoRAExpert)}
                if mods:
                    out[i] = mods
        return out

    def lora_moe_modules(self) -> dict[str, PrunableLoRAMoE]:
        return {n: m for n, m in self.named_modules() if isinstance(m, PrunableLoRAMoE)}

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of every adapter (LoRA A/B, LoRA-MoE routers), in module order."""
        return [p for m in adapters_of(self).values() for p in m.adapter_parameters()]

    def num_adapter_parameters(self) -> int:
        return sum(m.num_adapter_parameters() for m in adapters_of(self).values())

    def reset_adapter_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every adapter's own tensors, in module order, as attaching them would have (with the
        same generator state): after a meta-device build, ``to_empty`` and loading the base weights."""
        for m in adapters_of(self).values():
            m.reset_adapter_parameters(generator)

    def expert_lora_ranks(self) -> dict[int, torch.Tensor]:
        """``{layer: LongTensor[num_experts]}`` (0 = no adapter). All targets of a layer share ranks
        when resized through the model methods; if they were resized apart this raises."""
        out = {}
        for i, mods in self.expert_lora_modules().items():
            ranks = [m.ranks for m in mods.values()]
            if any(not torch.equal(ranks[0], r) for r in ranks[1:]):
                detail = {t: m.ranks.tolist() for t, m in mods.items()}
                raise ValueError(f"layer {i}: expert LoRA targets have different ranks {detail}; read them per module")
            out[i] = ranks[0]
        return out

    # --- resizing ----------------------------------------------------------------------------
    def _expert_targets(self, layer: int, what: str) -> dict[str, ResizableLoRAExpert]:
        mods = self.expert_lora_modules()
        if layer not in mods:
            raise ValueError(f"{what}: layer {layer} has no expert LoRA; layers with expert LoRA: {sorted(mods)}")
        return mods[layer]

    def prune_expert_lora(self, plan: dict[int, Iterable[int]], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the LoRA of the given experts (``{layer: [expert, ...]}``) on every adapted projection.
        The whole plan is checked before anything changes."""
        plan = {layer: list(experts) for layer, experts in plan.items()}
        for layer, experts in plan.items():
            for m in self._expert_targets(layer, "prune_expert_lora").values():
                m.check_prune(experts)
        for layer, experts in plan.items():
            for m in self._expert_targets(layer, "prune_expert_lora").values():
                m.prune(experts, optimizer)

    def grow_expert_lora(self, plan: dict[int, dict[int, int]], optimizer: torch.optim.Optimizer | None = None,
                         generator: torch.Generator | None = None) -> None:
        """Add ranks (``{layer: {expert: delta_r}}``) on every adapted projection of those layers.
        The whole plan is checked before anything changes; new ranks join the param group of the
        model's other expert-LoRA parameters."""
        for layer, deltas in plan.items():
            for m in self._expert_targets(layer, "grow_expert_lora").values():
                m.check_grow(dict(deltas))
                optim.check_new_rows(optimizer, m.adapter_parameters())
        group = None
        if optimizer is not None:
            others = [p for mods in self.expert_lora_modules().values() for m in mods.values()
                      for p in m.adapter_parameters()]
            group = optim.find_group(optimizer, others)
            if group is None and len(optimizer.param_groups) > 1:
                raise ValueError("grow_expert_lora: no expert-LoRA parameter is left in the optimizer to tell which "
                                 f"of its {len(optimizer.param_groups)} param groups new ranks belong to")
        for layer, deltas in plan.items():
            for m in self._expert_targets(layer, "grow_expert_lora").values():
                m.grow(dict(deltas), optimizer, generator, group=group)

    def shrink_expert_lora(self, plan: dict[int, dict[int, int]], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the newest ranks (``{layer: {expert: delta_r}}``): the inverse of ``grow_expert_lora``."""
        for layer, deltas in plan.items():
            for m in self._expert_targets(layer, "shrink_expert_lora").values():
                m.check_shrink(dict(deltas))
        for layer, deltas in plan.items():
            for m in self._expert_targets(layer, "shrink_expert_lora").values():
                m.shrink(dict(deltas), optimizer)

    def prune_lora_moe(self, plan: dict[str, Iterable[int]], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep only the listed experts (current indices) of each LoRA-MoE module (``{path: [i, ...]}``).
        The whole plan is checked before anything changes."""
        mods = self.lora_moe_modules()
        unknown = [n for n in plan if n not in mods]
        if unknown:
            raise ValueError(f"prune_lora_moe: {unknown} are not LoRA-MoE modules; modules: {list(mods)}")
        for name, keep in plan.items():
            mods[name].check_prune(keep)
        for name, keep in plan.items():
            mods[name].prune_experts(keep, optimizer)

    def load_adapter(self, directory, check_base: bool = True):
        """Attach and load an adapter written by ``minimoe.save_adapter`` (see ``adapters/io.py``)."""
        from .io import load_adapter

        return load_adapter(self, directory, check_base)

    # --- description -------------------------------------------------------------------------
    def adapter_summary(self) -> str:
        """A table of what is attached: a section per adapter kind (each kind writes its own: ``summary``),
        parameters throughout."""
        by_kind: dict[type, dict] = {}
        for name, m in adapters_of(self).items():
            by_kind.setdefault(type(m), {})[name] = m
        kinds = sorted(by_kind, key=lambda k: SUMMARY_ORDER.index(k) if k in SUMMARY_ORDER else len(SUMMARY_ORDER))
        lines = [line for kind in kinds for line in kind.summary(by_kind[kind])]
        if not lines:
            return "no adapters attached"
        total = self.num_adapter_parameters()
        lines.append(f"adapter parameters: {total:,} trainable of {self.num_parameters():,} "
                     f"({100 * total / max(1, self.num_parameters()):.3f}%)")
        return "\n".join(lines)
