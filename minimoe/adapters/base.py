"""The adapter protocol: what every adapter kind says about itself, so that attaching, saving, loading,
checkpointing and merging never ask which kind they hold.

An adapter wraps one plain base module (an ``nn.Linear`` or a ``StackedLinear`` of experts) and keeps the
base's tensors under the plain module's keys (``q_proj.weight``, ``experts.gate_proj.weight``), so base
checkpoints load as they are. Each kind (``Adapter`` subclass, registered in ``KINDS`` by its ``kind``):

* ``adapter_parameters()`` / ``num_adapter_parameters()`` — what trains, and how much of it;
* ``spec()`` — its layout and hyperparameters as one JSON-able dict; ``from_spec(base, spec)`` rebuilds an
  adapter of exactly that layout (values freshly initialised), the same way for adapter files and for
  training checkpoints (which then load the saved tensors by parameter name);
* ``adapter_tensors()`` / ``expected_shapes(base, spec)`` / ``load_adapter_tensors(tensors)`` — the tensors
  of an adapter file (``{suffix: tensor}``, keyed ``{module path}.{suffix}`` in the file);
* ``merged_weight()`` — the base weight with the adapter folded in (kinds that cannot merge say so);
* ``reset_adapter_parameters(generator)`` — initialise the adapter's own tensors on request: a model built
  on the meta device, given storage by ``to_empty`` and loaded, is then exactly as if built eagerly;
* ``base_module()`` — a plain module holding the same base tensors (what the adapter wrapped).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class AdapterError(ValueError):
    """An adapter that does not fit the model, or a damaged adapter directory."""


KINDS: dict[str, type[Adapter]] = {}


class Adapter(nn.Module):
    """Base of every adapter kind (see the module docstring for the protocol)."""

    kind: ClassVar[str] = ""  # key of the kind in adapter files and checkpoints
    base_type: ClassVar[type[nn.Module]] = nn.Module  # what it wraps (exactly this type)
    base_keys: ClassVar[tuple[str, ...]] = ("weight", "bias")  # its state-dict entries that are the base's
    required: ClassVar[tuple[str, ...]] = ()  # spec fields an adapter file must record
    mergeable: ClassVar[bool] = True  # whether merged_weight() exists (a routed mixture has no single weight)
    saves_input: ClassVar[bool] = False  # whether its backward needs the wrapped linear's input (LoRA A's gradient)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            KINDS[cls.kind] = cls

    # --- what trains ------------------------------------------------------------------------------
    def adapter_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def num_adapter_parameters(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    def reset_adapter_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise the adapter's own tensors as at creation (the base is not touched)."""
        raise NotImplementedError

    # --- layout ------------------------------------------------------------------------------------
    def spec(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, base: nn.Module, spec: dict, generator: torch.Generator | None = None) -> Adapter:
        raise NotImplementedError

    @classmethod
    def check_spec(cls, base: nn.Module, spec: dict) -> str | None:
        """What is wrong with ``spec`` for ``base`` (None if it fits)."""
        return None

    # --- files -------------------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def expected_shapes(cls, base: nn.Module, spec: dict) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the tensors of an adapter file (``adapter_tensors``' keys) into this adapter."""
        own = dict(self.named_parameters())
        for key, value in tensors.items():
            own[key].copy_(value)

    # --- base --------------------------------------------------------------------------------------
    @classmethod
    def summary(cls, named: dict[str, Adapter]) -> list[str]:
        """This kind's section of ``model.adapter_summary()``: a header and a row per adapter (``named``: the
        model's adapters of this kind, by module path, in module order)."""
        return [f"{cls.__name__:<40}  {'params':>10}"] + [f"{n:<40}  {m.num_adapter_parameters():>10,}"
                                                          for n, m in named.items()]

    def saved_bytes(self, rows: int, elt: int) -> int:
        """Activation bytes its own path keeps for the backward over ``rows`` tokens (``elt`` bytes per activation
        element), beyond the input (``saves_input``): the memory plan's term for this kind (``minimoe plan``)."""
        return 0

    def merged_weight(self) -> torch.Tensor:
        raise AdapterError(f"a {type(self).__name__} cannot be merged into its base weight")

    def base_module(self) -> nn.Module:
        raise NotImplementedError


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at module path ``name`` of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def adapters_of(model: nn.Module) -> dict[str, Adapter]:
    """``{module path: adapter}`` in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Adapter)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without the adapters' own entries: what the base checkpoint holds."""
    own = {f"{name}.{key}" for name, m in adapters_of(model).items() for key in m.state_dict()
           if key not in m.base_keys}
    return {k: v for k, v in model.state_dict().items() if k not in own}


def on_meta(t: torch.Tensor) -> bool:
    """Whether ``t`` has no storage yet (a meta-device build): adapters then skip initialisation until
    ``reset_adapter_parameters``."""
    return t.device.type == "meta"
