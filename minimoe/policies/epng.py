"""EPnG — expert prune-and-grow (paper §3, Algorithm 1; defaults from App. A.2).

    every step:     p̄_i^(l) += full-softmax router probability of expert i in MoE layer l (real tokens)
    at step ≥ T_w with step % T_p == 0:
        P = the lowest α fraction of experts that still have an adapter (global over all layers)
        G = the highest β fraction of the others
        prune P; spend the freed parameters on rank growth of G (budget-neutral, counted in parameters)
        p̄ ← λ · p̄

No event at the last step unless ``final_event`` (Alg. 1 fires one there; its grown ranks never train). ``mode``
runs Fig. 3a's ablation: ``prune-only`` (no growth) or ``grow-only`` (no pruning, over budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .stats import RoutingStats
from .base import Context, Policy, option


class EPnG(Policy):
    name = "epng"
    needs_router = True

    @dataclass
    class Config:
        alpha: float = option(0.2, "pruning ratio α: share of the experts that still have an adapter pruned "
                                   "at each event", low=0.0, high=1.0)
        beta: float = option(0.2, "growth ratio β: share of the experts (most important first) that receive "
                                  "freed rank", low=0.0, high=1.0)
        warmup: int = option(100, "T_w: no prune/grow event before this step", low=0)
        interval: int = option(50, "T_p: a prune/grow event every T_p steps from T_w on", low=1)
        decay: float = option(0.2, "λ: accumulated router importance is multiplied by this after each event", low=0.0, high=1.0)
        rank: int = option(8, "initial LoRA rank r of every adapted expert", low=1)
        lora_alpha: float = option(16.0, "LoRA alpha (scaling alpha/r, fixed)", low=0.0)
        probe_batches: int = option(8, "training batches on which the importance of the base model (at the start) "
                                       "and of the fine-tuned one (at the end) is measured, for EPnG Fig. 6 / "
                                       "App. D; 0: off", low=0)
        final_event: bool = option(False, "also fire an event at the last step, as Alg. 1 does literally (its grown "
                                          "ranks never train and it prunes trained adapters: off by default)")
        mode: str = option("prune-grow", "prune-grow (the method), prune-only (no growth: the budget shrinks) or "
                                         "grow-only (no pruning; grows what a prune would have freed: over budget) "
                                         "-- EPnG Fig. 3a's ablation", choices=("prune-grow", "prune-only", "grow-only"))
        targets: tuple[str, ...] = option(("gate_proj", "up_proj"),
                                          "expert projections that get LoRA (gate_proj, up_proj, down_proj)")

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if not (0 <= c.alpha < 1 and 0 <= c.beta < 1):
            raise ValueError(f"epng: alpha and beta must be in [0, 1), got {c.alpha}, {c.beta}")
        if c.interval <= 0:
            raise ValueError(f"epng: interval must be positive, got {c.interval}")
        self.stats = RoutingStats()
        self.budget = None  # trainable adapter parameters at the start (the ceiling)
        self.probe_state = None  # data position of the importance probe (the run's first batches)
        self.ctx = None

    def setup(self, model, ctx: Context) -> None:
        c = self.config
        self.stats, self.ctx = ctx.stats, ctx  # the run's routing statistics: importance of MoE layer units
        model.add_expert_lora(c.rank, c.lora_alpha, c.targets, generator=self.generator)
        if self.budget is None:
            self.budget = model.num_adapter_parameters()
        if self.probe_state is None and ctx.dataset is not None:
            self.probe_state = ctx.dataset.state_dict()

    def probe(self, model, step: int, which: str) -> dict:
        """Mean full-softmax importance per (layer, expert) on the probe batches: of the base model at the start
        (the LoRA B matrices are zero, so the adapted model routes exactly as the base does) and of the
        fine-tuned model at the end, on the same batches."""
        stats = self.ctx.measure_routing(model, self.config.probe_batches, self.probe_state)
        return {"event": "importance_probe", "step": step, "policy": self.name, "model": which,
                "batches": self.config.probe_batches,
                "importance": {str(l): s.mean_importance.tolist() for l, s in stats.snapshot(stats.layers()).items()}}

    def start_events(self, model) -> list[dict]:
        return [self.probe(model, 0, "base")] if self.config.probe_batches else []

    def end_events(self, model, step: int) -> list[dict]:
        if not self.config.probe_batches or self.probe_state is None:  # (a run resumed from before probes)
            return []
        return [self.probe(model, step, "fine-tuned")]

    def trainable_parameters(self, model):
        return model.adapter_parameters()

    def layer_importance(self) -> dict[int, list[float]]:
        """``{layer: [p̄ of each expert]}`` over every MoE layer seen (as of the last statistics sync)."""
        return {l: s.mean_importance.tolist() for l, s in self.stats.snapshot(self.stats.layers()).items()}

    def importance(self) -> dict[tuple[int, int], float]:
        """``{(layer, expert): p̄}`` over every MoE layer seen."""
        return {(l, e): v for l, p in self.layer_importance().items() for e, v in enumerate(p)}

    def after_step(self, step, model, optimizer) -> list[dict]:
        c = self.config
        if step < c.warmup or step % c.interval:
            return []
        if not c.final_event and self.ctx is not None and 0 < self.ctx.total_steps <= step:
            return []  # Alg. 1's event at the last step would grow ranks that never train
        record = self.event(step, model, optimizer)
        # an event time at which nothing could be pruned or grown (too few adapted experts left) changes
        # nothing: the statistics still decay as Alg. 1 says, but no prune/grow event is logged or counted
        return [record] if record["pruned"] or record["grown"] else []

    def event(self, step, model, optimizer) -> dict:
        c = self.config
        ranks = model.expert_lora_ranks()
        per_layer = self.layer_importance()
        importance = {(l, e): v for l, p in per_layer.items() for e, v in enumerate(p)}
        alive = [(l, e) for l, r in ranks.items() for e in range(len(r)) if r[e] > 0]
        # ascending importance; ties broken by (layer, expert) so every run decides the same way
        order = sorted(alive, key=lambda le: (importance.get(le, 0.0), le))
        n_prune = math.floor(c.alpha * len(alive))
        n_grow = math.floor(c.beta * len(alive))
        mods = model.expert_lora_modules()
        # parameters per rank of an expert = Σ over its adapted projections of (in + out)
        cost = {le: sum(m.in_features + m.out_features for m in mods[le[0]].values()) for le in alive}
        if c.mode == "grow-only":  # no pruning: grow what pruning the least important would have freed
            pruned, grown = [], list(reversed(order))[:n_grow]
            self.budget += sum(cost[le] * int(ranks[le[0]][le[1]]) for le in order[:n_prune])
        else:
            pruned = order[:n_prune]
            grown = [] if c.mode == "prune-only" else [le for le in reversed(order[n_prune:])][:n_grow]

        before = model.num_adapter_parameters()
        plan: dict[int, list[int]] = {}
        for l, e in pruned:
            plan.setdefault(l, []).append(e)
        model.prune_expert_lora(plan, optimizer=optimizer)
        after_prune = model.num_adapter_parameters()

        # budget-neutral growth: spend what is left under the budget, evenly, the most important first
        grow_plan: dict[int, dict[int, int]] = {}
        available = self.budget - after_prune
        if grown:
            cap = {le: min(min(m.in_features, m.out_features) for m in mods[le[0]].values()) - int(ranks[le[0]][le[1]])
                   for le in grown}
            delta = {le: 0 for le in grown}
            progress = True
            while progress:  # one rank at a time round-robin: exact, and never above the budget
                progress = False
                for le in grown:
                    if delta[le] < cap[le] and cost[le] <= available:
                        delta[le] += 1
                        available -= cost[le]
                        progress = True
            for (l, e), d in delta.items():
                if d:
                    grow_plan.setdefault(l, {})[e] = d
            model.grow_expert_lora(grow_plan, optimizer=optimizer, generator=self.generator)
        after = model.num_adapter_parameters()
        assert after <= self.budget, "EPnG exceeded its parameter budget"
        if c.mode == "grow-only":  # the budget is what the grown model holds (what was not spent stays unspent)
            self.budget = after
        record = {
            "event": "prune_grow", "step": step, "policy": self.name,
            "pruned": [[l, e] for l, e in pruned],
            "grown": [[l, e, d] for l, g in grow_plan.items() for e, d in g.items()],
            "importance_threshold_prune": importance.get(pruned[-1]) if pruned else None,
            "importance_threshold_grow": importance.get(grown[-1]) if grown else None,
            "budget": self.budget, "params_before": before, "params_after_prune": after_prune,
            "params_after": after, "unspent": self.budget - after,
            "experts_with_adapter": sum(int((r > 0).sum()) for r in model.expert_lora_ranks().values()),
            "ranks": {str(l): r.tolist() for l, r in model.expert_lora_ranks().items()},
            "importance": {str(l): p for l, p in per_layer.items()},
        }
        self.stats.decay(c.decay)
        return record

    def event_line(self, event: dict) -> str | None:
        if event["event"] != "prune_grow":
            return None
        added = sum(d for _, _, d in event["grown"])
        return (f"step {event['step']}: pruned {len(event['pruned'])} expert adapters, grew {len(event['grown'])} "
                f"experts by {added} ranks; {event['experts_with_adapter']} experts keep an adapter; "
                f"parameters {event['params_after']:,} of budget {event['budget']:,}")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "budget": self.budget,  # the statistics are the trainer's to save
                "probe_state": self.probe_state}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.budget = state["budget"]
        self.probe_state = state.get("probe_state")  # (absent before 2026-12: no probe at the end then)
