"""The papers' analyses at full scale: recipes that expand to one run per point (``minimoe train --recipe
SWEEP``; :mod:`minimoe.cli.sweep` lists, plans, runs or prints them).

A point is a main-table recipe (:mod:`minimoe.train.recipes`) with the flags that move it along the sweep's
axis, so each point's run is exactly ``minimoe train --recipe BASE FLAGS`` and evaluates with ``minimoe eval
--recipe BASE``:

* ``epng-fig3-olmoe-math``: EPnG Fig. 3 on OLMoE / MetaMathQA, scored on GSM8K as §5 does: (a) LoRA,
  grow-only, prune-only, prune-and-grow; (b) LoRA and EPnG at ranks 2-32 (EPnG at the budget of the LoRA of
  its rank); (c) alpha = beta from 0.1 to 0.5. The paper does not say which backbone §5 used (its LoRA
  65.50% matches neither table); OLMoE, its first, is the choice here.
* ``epng-fig5``: EPnG and LoRA on both backbones (the runs of Tables 1-2 on MetaMathQA), for their loss curves.
* ``dmep-table2-qwen3-0.6b-TASK``: DMEP Table II on Qwen3-0.6B (the paper: ScienceQA): tau in
  {0.05, 0.1, 0.15, 0.2} pruned at step 100 (as Table II states), the pruning step 50 / 100 / 250 at
  tau = 0.1, the symmetric LoRA-MoE with E = 8 and the constrained one with E = 4.
"""

from __future__ import annotations

from dataclasses import dataclass

from .recipes import RECIPES

Point = tuple[str, tuple[str, ...]]  # (the recipe it starts from, the flags that make the point)


@dataclass(frozen=True)
class Sweep:
    name: str
    paper: str  # the paper, figure or table
    reported: str  # what the paper reports for it
    points: dict[str, Point]

    def command(self, point: str, out: str, extra: tuple[str, ...] = ()) -> list[str]:
        """The ``minimoe train`` arguments of one point (``out``: its run directory)."""
        recipe, flags = self.points[point]
        return ["--recipe", recipe, *flags, *extra, "--out", out]


def _fig3(model: str) -> Sweep:
    lora, epng = f"lora-{model}-math", f"epng-{model}-math"
    points: dict[str, Point] = {"lora-r8": (lora, ()), "epng-r8": (epng, ()),
                                "epng-grow-only": (epng, ("--epng-mode", "grow-only")),
                                "epng-prune-only": (epng, ("--epng-mode", "prune-only"))}
    for r in (2, 4, 16, 32):
        points[f"lora-r{r}"] = (lora, ("--lora-rank", str(r)))
        points[f"epng-r{r}"] = (epng, ("--epng-rank", str(r)))
    for f in ("0.1", "0.3", "0.4", "0.5"):
        points[f"epng-f{f}"] = (epng, ("--epng-alpha", f, "--epng-beta", f))
    return Sweep(f"epng-fig3-{model}-math", "EPnG Fig. 3 (§5, GSM8K)",
                 "(a) LoRA 65.50, grow-only 64.97, prune-only 65.81, prune-and-grow 66.41 (GSM8K %); (b) LoRA "
                 "fluctuates over ranks, EPnG stays stable; (c) gains up to a fraction of about 0.2, then a plateau",
                 points)


def _fig5() -> Sweep:
    points = {f"{method}-{model}": (f"{method}-{model}-math", ()) for model in ("olmoe", "qwen1.5-moe")
              for method in ("lora", "epng")}
    return Sweep("epng-fig5", "EPnG Fig. 5 (App. C.2)", "EPnG's training loss tracks LoRA's on both backbones",
                 points)


def _table2(task: str) -> Sweep:
    dmep, sym = f"dmep-qwen3-0.6b-{task}", f"lora-moe-qwen3-0.6b-{task}"
    points: dict[str, Point] = {"symmetric-e8": (sym, ()), "symmetric-e4": (sym, ("--dmep-num-experts", "4"))}
    for tau in ("0.05", "0.1", "0.15", "0.2"):
        points[f"tau{tau}"] = (dmep, ("--dmep-tau", tau, "--dmep-prune-step", "100"))
    for step in ("50", "250"):
        points[f"prune-step{step}"] = (dmep, ("--dmep-prune-step", step))
    return Sweep(f"dmep-table2-qwen3-0.6b-{task}", "DMEP Table II (Qwen3-0.6B" + (", ScienceQA)" if task == "scienceqa"
                 else f"; the paper's is on ScienceQA, this one on {task})"),
                 "symmetric E=8 42.7M 91.32%, E=4 21.3M 90.29%; tau 0.05/0.1/0.15/0.2: 39.7M 91.37%, 31.2M 91.55%, "
                 "13.1M 90.65%, 10.8M 90.74%; prune at step 50/100/250: 91.23/91.55/91.23%", points)


def _all() -> dict[str, Sweep]:
    sweeps = [_fig3("olmoe"), _fig5(), *(_table2(t) for t in ("scienceqa", "openbookqa", "gsm8k"))]
    for sweep in sweeps:  # every point starts from a recipe that exists
        missing = [recipe for recipe, _ in sweep.points.values() if recipe not in RECIPES]
        assert not missing, f"{sweep.name}: unknown recipes {missing}"
    return {s.name: s for s in sweeps}


SWEEPS = _all()


def listing() -> str:
    """``--recipe list``'s sweeps: each with what it reproduces and its points."""
    width = max(map(len, SWEEPS))
    return "\n".join(f"{s.name:<{width}}  {s.paper}: {len(s.points)} runs ({', '.join(s.points)})"
                     for s in SWEEPS.values())
