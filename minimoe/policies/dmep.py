"""DMEP — dynamic module-wise expert pruning (paper §III, Algorithm 1).

    exploration:  every targeted linear is a LoRA-MoE (E experts, top-k router); loss = CE + c · Σ LB
    prune once (default: end of the first epoch; optionally when every module's drift < threshold):
        u_i = c_i / Σ_j c_j from hard top-k counts; keep experts with u_i ≥ τ, plus the most used ones
        until max(k_min, top_k) remain; slice experts, router rows and optimizer state; LB loss off
    then: train on the heterogeneous architecture
Gini, normalised entropy and drift of each module's counts are logged every ``log_interval`` steps.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from ..model.routing import combined_balancing_loss
from .stats import RoutingStats, drift, gini, normalized_entropy
from .base import Context, Policy, option


class DMEP(Policy):
    name = "dmep"
    needs_router = True  # the hard counts come from the LoRA-MoE routes of training forwards
    schedule = ("cosine", 0.1)  # DMEP §IV: cosine with 10% warm-up

    @dataclass
    class Config:
        num_experts: int = option(8, "LoRA experts E per adapted linear", low=1)
        top_k: int = option(2, "experts chosen per token by each module's router", low=1)
        rank: int = option(8, "LoRA rank of every expert", low=1)
        lora_alpha: float = option(16.0, "LoRA alpha (scaling alpha/r)", low=0.0)
        lb_coef: float = option(0.01, "load-balancing loss coefficient during exploration (off after pruning)", low=0.0)
        lb_reduce: str = option("mean", "how the modules' LB losses combine before lb_coef: mean (the Switch / "
                                        "transformers convention: lb_coef weighs one module's loss, whatever the "
                                        "number of modules) or sum (DMEP's Eq., grows with the modules: 196 on "
                                        "Qwen3-0.6B)", choices=("mean", "sum"))
        tau: float = option(0.1, "utilisation threshold τ: experts with a smaller share of hard top-k choices "
                                 "are pruned", low=0.0, high=1.0)
        k_min: int = option(2, "minimum surviving experts per module (and never fewer than top_k)", low=1)
        prune_step: int = option(0, "step of the one-shot pruning; 0 = the end of the first epoch; -1 = never (the "
                                    "symmetric LoRA-MoE baseline: LB loss on throughout)", low=-1)
        drift_threshold: float = option(0.0, "if > 0, prune as soon as every module's routing drift (L1 between "
                                             "consecutive count distributions) is below it", low=0.0)
        log_interval: int = option(10, "steps between Gini / entropy / drift measurements in events.jsonl", low=0)
        targets: tuple[str, ...] = option(
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            "linears that get a LoRA-MoE (dense linears only: on an MoE base, attention and shared expert)")

    def __init__(self, config=None):
        super().__init__(config)
        self.pruned_at = None
        self.prune_step = None
        self.snapshot: dict[str, torch.Tensor] = {}  # counts at the last log, per module
        self.previous: dict[str, torch.Tensor] = {}  # counts of the previous interval, per module
        self.last: dict = {}
        self.stats = RoutingStats()
        self.log = print
        self.all_reduce = lambda t: t  # the trainer's Context gives the sum over processes

    def setup(self, model, ctx: Context) -> None:
        c = self.config
        self.stats, self.log, self.all_reduce = ctx.stats, ctx.log, ctx.all_reduce
        model.add_lora_moe(c.num_experts, c.top_k, c.rank, c.lora_alpha, c.targets, generator=self.generator)
        self.prune_step = math.inf if c.prune_step < 0 else c.prune_step or ctx.steps_per_epoch
        if self.pruned_at is not None:  # resumed after pruning: the LB loss stays off
            for m in model.lora_moe_modules().values():
                m.lb_enabled = False

    def trainable_parameters(self, model):
        return model.adapter_parameters()

    def extra_loss(self, out, mask):
        """Until the prune, ``lb_loss`` of the forward: the pools the LoRA-MoE modules produced over the tokens
        of ``mask`` (the forward's token mask), f and the token count summed over the processes."""
        return None if self.pruned_at is not None else lb_loss(out, self.config, self.all_reduce)

    def module_metrics(self, model) -> dict[str, dict]:
        """Gini, normalised entropy and drift of every module's counts over the last interval."""
        out = {}
        for name, m in model.lora_moe_modules().items():
            counts = self._counts(name, m).double()
            interval = counts - self.snapshot.get(name, torch.zeros_like(counts))
            d = drift(self.previous[name], interval) if name in self.previous else float("nan")
            out[name] = {"gini": gini(interval), "entropy": normalized_entropy(interval), "drift": d,
                         "experts": m.num_experts}
            self.previous[name], self.snapshot[name] = interval, counts
        return out

    def _counts(self, name: str, m) -> torch.Tensor:
        """The module's hard top-k counts so far (host fp32; zeros before its first training forward)."""
        snapshot = self.stats.snapshot([name])
        return snapshot[name].counts if snapshot else torch.zeros(m.num_experts)

    def survivors(self, counts: torch.Tensor, top_k: int) -> tuple[list[int], bool]:
        """Experts with u_i ≥ τ, topped up with the most used until max(k_min, top_k) remain.
        Returns (sorted positions, whether the floor had to be applied)."""
        c = self.config
        u = counts.double() / counts.double().sum().clamp_min(1e-12)
        keep = [i for i in range(len(u)) if u[i] >= c.tau]
        floor = min(len(u), max(c.k_min, top_k))
        clamped = len(keep) < floor
        if clamped:  # the experts above τ are the most used, so the top `floor` contain them all
            keep = sorted(sorted(range(len(u)), key=lambda i: (-float(u[i]), i))[:floor])
        return keep, clamped

    def after_step(self, step, model, optimizer) -> list[dict]:
        c = self.config
        events = []
        if c.log_interval and step % c.log_interval == 0:
            self.last = self.module_metrics(model)
            events.append({"event": "routing", "step": step, "policy": self.name, "modules": self.last})
        if self.pruned_at is None:
            stable = (c.drift_threshold > 0 and self.last and
                      all(v["drift"] == v["drift"] and v["drift"] < c.drift_threshold for v in self.last.values()))
            if step >= self.prune_step or stable:
                events.append(self.prune(step, model, optimizer))
        return events

    def prune(self, step, model, optimizer) -> dict:
        plan, clamped, survivors, counts = {}, [], {}, {}
        before = model.num_adapter_parameters()
        for name, m in model.lora_moe_modules().items():
            counts[name] = self._counts(name, m)
            keep, was_clamped = self.survivors(counts[name], m.top_k)
            plan[name] = keep
            survivors[name] = [int(m.expert_ids[i]) for i in keep]
            for history in (self.snapshot, self.previous):  # interval statistics follow the slicing
                if name in history:
                    history[name] = history[name][keep]
            if was_clamped:
                clamped.append(name)
        model.prune_lora_moe(plan, optimizer=optimizer)
        for name, keep in plan.items():  # the statistics follow the slicing
            self.stats.keep(name, keep)
        for m in model.lora_moe_modules().values():
            m.lb_enabled = False
        self.pruned_at = step
        if clamped:
            self.log(f"dmep: tau={self.config.tau} would leave fewer than max(k_min={self.config.k_min}, top_k) "
                  f"experts in {len(clamped)} module(s); kept the most used ones instead: {', '.join(clamped)}")
        return {"event": "dmep_prune", "step": step, "policy": self.name, "survivors": survivors,
                "clamped": clamped, "params_before": before, "params_after": model.num_adapter_parameters(),
                "counts": {name: c.tolist() for name, c in counts.items()}}  # the hard counts it decided on

    def event_line(self, event: dict) -> str | None:
        if event["event"] != "dmep_prune":
            return None
        kept = [len(s) for s in event["survivors"].values()]
        return (f"step {event['step']}: pruned LoRA-MoE experts: {sum(kept)} of "
                f"{len(kept) * self.config.num_experts} survive in {len(kept)} modules "
                f"(per module {min(kept)}-{max(kept)}); adapter parameters {event['params_before']:,} -> "
                f"{event['params_after']:,}; load-balancing loss off")

    def metrics(self) -> dict:
        return {"dmep_pruned": self.pruned_at is not None}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pruned_at": self.pruned_at, "snapshot": self.snapshot,
                "previous": self.previous, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pruned_at, self.snapshot, self.previous = state["pruned_at"], state["snapshot"], state["previous"]
        self.last = state["last"]


def lb_loss(out, config: DMEP.Config | None = None, all_reduce=None) -> torch.Tensor | None:
    """DMEP's load-balancing term of a forward, as training adds it to the loss: ``lb_coef`` times the
    modules' losses combined by ``lb_reduce`` (``combined_balancing_loss``: mean over the modules by default,
    ``sum`` as the paper's equation reads). None when the forward had no LoRA-MoE with its loss on. The
    benchmark, the plan check and the self-check train on this, with DMEP's defaults."""
    config = config or DMEP.Config()
    if not out.adapter_balancing:
        return None
    return config.lb_coef * combined_balancing_loss(out.adapter_balancing, config.lb_reduce, all_reduce)
