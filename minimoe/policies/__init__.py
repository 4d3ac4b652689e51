"""Training policies: what trains, and when and how the model is resized."""

from .base import Context, Policy
from .dmep import DMEP
from .epng import EPnG
from .esft import ESFT
from .simple import Full, LoRA

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LoRA, EPnG, DMEP, ESFT, Full)}


def make_policy(name: str, options: dict | None = None) -> Policy:
    """Build a policy by name with option overrides (unknown names and options are errors)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    cls = POLICIES[name]
    fields = cls.Config.__dataclass_fields__
    unknown = [k for k in (options or {}) if k not in fields]
    if unknown:
        raise ValueError(f"policy {name}: unknown option(s) {unknown}; options: {list(fields)}")
    return cls(cls.Config(**(options or {})))


__all__ = ["Context", "DMEP", "EPnG", "ESFT", "Full", "LoRA", "POLICIES", "Policy", "make_policy"]
