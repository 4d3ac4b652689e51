"""ESFT — expert-specialised fine-tuning (deepseek-ai/ESFT), the baseline of the EPnG paper.

    score every routed expert on a sample of the training data:
        gate  — sum of its top-k routing weights      token — its share of the top-k slots
    normalise as the official code does (``normalize="global"``, the default: each expert's score divided
        by its sum over layers, ``scores / scores.sum(axis=0)``), or per layer (``"layer"``, the paper's text)
    per layer, take experts by descending score until the cumulative score reaches top_p
        (the expert crossing the threshold is included)
    train those experts' full weights (``SelectedExperts``, an adapter) and, with ``shared``, the shared
    experts' (``TrainedLinear``); everything else is frozen and stays out of the optimizer
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass

import torch

from ..adapters.selected import SelectedExperts
from ..adapters.trained import TrainedLinear
from .base import Context, Policy, option


def normalize_scores(sums: dict[int, torch.Tensor], how: str) -> dict[int, torch.Tensor]:
    """``layer``: each layer's scores sum to 1 (the paper). ``global``: what the reference code does
    (scripts/expert/generate_expert_config.py, ``scores / np.sum(scores, axis=0)`` on a [layers, experts]
    table): each expert's score divided by that expert's total over the layers."""
    if how == "layer":
        return {l: s / s.sum().clamp_min(1e-12) for l, s in sums.items()}
    layers = sorted(sums)
    per_expert = torch.stack([sums[l] for l in layers]).sum(0).clamp_min(1e-12)
    return {l: sums[l] / per_expert for l in layers}


def top_p_selection(scores: torch.Tensor, top_p: float) -> list[int]:
    """Experts by descending score until the cumulative score reaches ``top_p`` (crossing one included)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    chosen, total = [], 0.0
    for i in order:
        chosen.append(i)
        total += float(scores[i])
        if total >= top_p:
            break
    return sorted(chosen)


class ESFT(Policy):
    name = "esft"
    setup_runs_model = True  # the experts are scored on training batches before anything trains
    trains_base_weights = True  # the selected experts' own weights

    @dataclass
    class Config:
        score: str = option("token", "expert score: token (share of top-k slots) or gate (sum of routing "
                                     "weights)", choices=("token", "gate"))
        top_p: float = option(0.0, "per layer, experts by descending score until their cumulative score "
                                   "reaches top_p; 0 = the ESFT paper's value (0.2 for token, 0.1 for gate)", low=0.0, high=1.0)
        normalize: str = option("global", "global (each expert's score divided by its sum over the layers: the "
                                          "official code, generate_expert_config.py) or layer (each layer's scores "
                                          "sum to 1, as the paper's text reads)", choices=("global", "layer"))
        sample_batches: int = option(32, "training batches scored before training starts", low=1)
        shared: bool = option(False, "also train the shared expert(s) in full (Qwen1.5-MoE's shared_expert; "
                                     "ESFT's train_shared_experts); their gate stays frozen")
        targets: tuple[str, ...] = option(("gate_proj", "up_proj", "down_proj"),
                                          "expert projections trained in full for the selected experts")

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if c.score not in ("token", "gate") or c.normalize not in ("layer", "global"):
            raise ValueError(f"esft: score must be token|gate and normalize layer|global, got {c.score}, {c.normalize}")
        bad = [t for t in c.targets if t not in ("gate_proj", "up_proj", "down_proj")]
        if bad or not c.targets:
            raise ValueError(f"esft: targets {list(c.targets)}: each must be one of the experts' gate_proj, "
                             "up_proj, down_proj")
        if not 0 <= c.top_p <= 1:
            raise ValueError(f"esft: top_p must be in [0, 1] (0: the paper's value for the score), got {c.top_p}")
        if c.top_p == 0:
            self.config = dataclasses.replace(c, top_p=0.1 if c.score == "gate" else 0.2)
        self.selection: dict[int, list[int]] | None = None
        self.scores: dict[int, list[float]] | None = None

    def score(self, model, ctx: Context) -> dict[int, torch.Tensor]:
        """Per MoE layer, the normalised score of every expert on ``sample_batches`` training batches (the
        first ones: training still starts at the first batch)."""
        stats = ctx.measure_routing(model, self.config.sample_batches)
        field = "gate" if self.config.score == "gate" else "counts"  # gate weights, or top-k slots
        sums = {layer: getattr(s, field) for layer, s in stats.snapshot(stats.layers()).items()}
        return normalize_scores(sums, self.config.normalize)

    def setup(self, model, ctx: Context) -> None:
        if not model.config.num_experts:
            raise ValueError("policy esft needs an MoE model (this one has no routed experts)")
        if self.selection is None:  # a resumed run keeps its saved selection
            scores = self.score(model, ctx)
            self.scores = {l: s.tolist() for l, s in scores.items()}
            self.selection = {l: top_p_selection(s, self.config.top_p) for l, s in scores.items()}
        model.requires_grad_(False)
        for layer, experts in self.selection.items():
            block = model.layers[layer].mlp.experts
            for t in self.config.targets:
                setattr(block, t, SelectedExperts(getattr(block, t), experts))
        if self.config.shared:
            shared = [m for m in (getattr(layer.mlp, "shared_expert", None) for layer in model.layers) if m is not None]
            if not shared:
                raise ValueError("--esft-shared: this model has no shared experts (Qwen1.5-MoE has; OLMoE has none)")
            for mlp in shared:
                for t in ("gate_proj", "up_proj", "down_proj"):
                    setattr(mlp, t, TrainedLinear(getattr(mlp, t)))

    def trainable_parameters(self, model):
        return [m.trained for m in model.modules() if isinstance(m, (SelectedExperts, TrainedLinear))]

    def start_events(self, model) -> list[dict]:
        return [self.selection_event()]

    def selection_event(self) -> dict:
        return {"event": "esft_selection", "step": 0, "policy": self.name, "score": self.config.score,
                "top_p": self.config.top_p, "normalize": self.config.normalize,
                "selection": {str(l): e for l, e in self.selection.items()},
                "scores": {str(l): s for l, s in (self.scores or {}).items()}}

    def event_line(self, event: dict) -> str | None:
        if event["event"] != "esft_selection":
            return None
        per_layer = " ".join(f"{l}:{len(e)}" for l, e in event["selection"].items())
        return f"esft: selected experts per layer (by {event['score']}, top_p {event['top_p']}): {per_layer}"

    def state_dict(self) -> dict:
        return {**super().state_dict(), "selection": self.selection, "scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.selection = {int(l): e for l, e in state["selection"].items()}
        self.scores = state["scores"]
