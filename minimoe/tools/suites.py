"""The papers' analyses in miniature: ``minimoe reproduce --suite NAME`` (several seeds, each point one
``minimoe train`` run, exact match on the built-in task's whole test split of 200 problems).

    minimoe reproduce --suite epng-fig3 --seeds 3     # EPnG Fig. 3 (a) ablation, (b) ranks, (c) fraction
    minimoe reproduce --suite epng-fig5 --seeds 3     # EPnG Fig. 5: training loss of EPnG and LoRA
    minimoe reproduce --suite dmep-table2 --seeds 3   # DMEP Table II: tau, and the constrained symmetric MoE

* ``epng-fig3`` on ``tiny-moe`` / ``tiny-arith`` (expert LoRA on gate+up, as the main table): (a) static
  LoRA, grow-only, prune-only and prune-and-grow at rank 8; (b) LoRA and EPnG at ranks 2-32, each EPnG at
  the budget of the LoRA of its rank (EPnG moves rank between experts, never adds any); (c) EPnG with the
  prune and grow fractions alpha = beta from 0.1 to 0.5.
* ``epng-fig5``: the loss curves of LoRA and EPnG at rank 8 (the runs of Fig. 3a), every seed, the
  prune/grow events marked.
* ``dmep-table2`` on ``tiny-dense`` / ``tiny-mix`` (all seven linears, as DMEP's Table I): DMEP at
  tau in {0.05, 0.1, 0.15, 0.2}, the symmetric LoRA-MoE (E=8, never pruned), the constrained symmetric
  LoRA-MoE with k experts in every module (k: DMEP's mean survivors per module at the default tau = 0.1,
  rounded; run after those) and dense LoRA; parameters after the prune, the second half's training
  throughput (after DMEP's prune at the end of epoch 1, step 64) and accuracy.

Runs go to ``OUT/<point>-seed<S>`` (a point shared by two panels is one run), the tables to ``OUT/table.md``
with the paper's numbers beside them, the figures (``plot`` extra) to ``OUT/*.png``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..train.recipes import SEVEN
from ..train.run_dir import RunDir
from .runs import Row

EVAL_LIMIT = 200  # the whole test split of either built-in task
RANKS = (2, 4, 8, 16, 32)
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
TAUS = (0.05, 0.1, 0.15, 0.2)
DEFAULT_TAU = 0.1
# a sweep records what a point does: one whose loss jumps (EPnG at large fractions) trains on to its end
TRAIN_ON = ("--divergence-factor", "0")


def lora(rank: int = 8) -> Row:
    return Row("lora", "tiny-moe", {"rank": rank, "dense_targets": []}, train=TRAIN_ON)


def epng(rank: int = 8, fraction: float = 0.2, mode: str = "prune-grow") -> Row:
    return Row("epng", "tiny-moe", {"rank": rank, "alpha": fraction, "beta": fraction, "mode": mode,
                                    "final_event": False}, train=TRAIN_ON)


def dmep(**options) -> Row:
    return Row("dmep", "tiny-dense", options, data="tiny-mix", train=TRAIN_ON)


ABLATION = {"static LoRA": "lora-r8", "grow-only": "epng-grow-only", "prune-only": "epng-prune-only",
            "prune-and-grow": "epng-r8"}
# EPnG Fig. 3a on OLMoE / GSM8K as its text gives them (Fig. 3b and 3c give no numbers in the text)
EPNG_FIG3A = {"static LoRA": 65.50, "grow-only": 64.97, "prune-only": 65.81, "prune-and-grow": 66.41}


def fraction_key(f: float) -> str:
    return "epng-r8" if f == 0.2 else f"epng-f{f:g}"


def epng_fig3_rows() -> dict[str, Row]:
    rows = {"lora-r8": lora(), "epng-r8": epng(), "epng-grow-only": epng(mode="grow-only"),
            "epng-prune-only": epng(mode="prune-only")}
    rows |= {f"lora-r{r}": lora(r) for r in RANKS} | {f"epng-r{r}": epng(r) for r in RANKS}
    return rows | {fraction_key(f): epng(fraction=f) for f in FRACTIONS}


def tau_key(tau: float) -> str:
    return f"dmep-tau{tau:g}"


def dmep_table2_rows() -> dict[str, Row]:
    rows = {"dense-lora": Row("lora", "tiny-dense", {"dense_targets": list(SEVEN)}, data="tiny-mix", train=TRAIN_ON),
            "lora-moe": dmep(prune_step=-1)}
    return rows | {tau_key(t): dmep(tau=t, prune_step=0) for t in TAUS}


def symmetric(k: int) -> Row:
    """The constrained symmetric baseline: a LoRA-MoE with ``k`` experts in every module, never pruned."""
    return dmep(num_experts=k, prune_step=-1)


# DMEP Table II (Qwen3-0.6B, ScienceQA): (params M, tok/s, accuracy %)
DMEP_TABLE2 = {"lora-moe": (42.7, 1368, 91.32), "symmetric": (21.3, 1439, 90.29), tau_key(0.05): (39.7, 1410, 91.37),
               tau_key(0.1): (31.2, 1438, 91.55), tau_key(0.15): (13.1, 1508, 90.65), tau_key(0.2): (10.8, 1511, 90.74)}


Results = dict[str, list[dict]]  # point -> the summaries of its seeds (reproduce.run_plan)


def scores(results: Results, key: str) -> list[float]:
    return [r["task_score_after"] for r in results[key]]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _cell(xs: list[float]) -> str:
    m, s = mean_std(xs)
    return f"{m:.3f} ± {s:.3f}"


def _params(results: Results, key: str) -> str:
    counts = sorted({r["trainable_parameters"] for r in results[key]})
    return f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}–{counts[-1]:,}"


def epng_fig3_table(results: Results) -> str:
    n = len(results["lora-r8"])
    lines = [f"**(a) Ablation** (tiny-moe, tiny-arith, rank 8, {n} seeds; the paper: OLMoE, GSM8K)", "",
             "| method | trainable params (end) | exact match (mean ± std) | the paper (GSM8K %) |",
             "|---|---:|---:|---:|"]
    lines += [f"| {name} | {_params(results, key)} | {_cell(scores(results, key))} | {EPNG_FIG3A[name]:.2f} |"
              for name, key in ABLATION.items()]
    lines += ["", "**(b) Rank sensitivity** (EPnG at the budget of the LoRA of the same rank)", "",
              "| rank | LoRA | EPnG | LoRA params | EPnG params (end) |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r} | {_cell(scores(results, f'lora-r{r}'))} | {_cell(scores(results, f'epng-r{r}'))} | "
              f"{_params(results, f'lora-r{r}')} | {_params(results, f'epng-r{r}')} |" for r in RANKS]
    for method in ("lora", "epng"):
        means = [statistics.mean(scores(results, f"{method}-r{r}")) for r in RANKS]
        lines.append(f"\n{'LoRA' if method == 'lora' else 'EPnG'}: mean over ranks {statistics.mean(means):.3f}, "
                     f"range of the means {max(means) - min(means):.3f}, "
                     f"std of the means {statistics.stdev(means):.3f}")
    lines += ["", "**(c) Prune-and-grow fraction** (alpha = beta, rank 8)", "",
              "| fraction | EPnG | LoRA (rank 8) |", "|---:|---:|---:|"]
    lines += [f"| {f:g} | {_cell(scores(results, fraction_key(f)))} | {_cell(scores(results, 'lora-r8'))} |"
              for f in FRACTIONS]
    return "\n".join(lines)


def final_loss(run: Path, share: float = 0.1) -> float:
    """The mean training loss over the last ``share`` of the steps (one step's loss is noisy)."""
    metrics = RunDir(run, writer=False).metrics()
    tail = metrics[-max(1, int(len(metrics) * share)):]
    return statistics.mean(m["loss"] for m in tail)


def prune_grow_steps(run: Path) -> list[int]:
    return [e["step"] for e in RunDir(run, writer=False).events() if e["event"] == "prune_grow"]


def epng_fig5_table(results: Results) -> str:
    lines = ["**Training loss** (tiny-moe, tiny-arith, rank 8; mean over the last 10% of the steps)", "",
             "| method | final loss (mean ± std) | exact match | prune/grow events |", "|---|---:|---:|---:|"]
    for name, key in (("static LoRA", "lora-r8"), ("EPnG", "epng-r8")):
        losses = [final_loss(r["run"]) for r in results[key]]
        events = [len(prune_grow_steps(r["run"])) for r in results[key]]
        lines.append(f"| {name} | {_cell(losses)} | {_cell(scores(results, key))} | {statistics.mean(events):g} |")
    return "\n".join(lines)


def survivors(run: Path) -> dict[str, int] | None:
    """Module name -> experts that survived DMEP's prune (None: the run did not prune)."""
    prunes = [e for e in RunDir(run, writer=False).events() if e["event"] == "dmep_prune"]
    return {name: len(kept) for name, kept in prunes[-1]["survivors"].items()} if prunes else None


def mean_survivors(results: Results, key: str) -> float:
    return statistics.mean(statistics.mean(survivors(r["run"]).values()) for r in results[key])


def dmep_table2_table(results: Results, k: int) -> str:
    sym = f"symmetric-k{k}"
    rows = [("Symmetric MoE (E=8)", "–", "lora-moe", "lora-moe"), (f"Symmetric MoE (E={k})", "–", sym, "symmetric")]
    rows += [("DMEP", f"{t:g}", tau_key(t), tau_key(t)) for t in TAUS]
    rows += [("Dense LoRA (r=8)", "–", "dense-lora", None)]
    n = len(results["lora-moe"])
    lines = [f"tiny-dense, tiny-mix, all seven linears, {n} seeds; the paper: Qwen3-0.6B, ScienceQA", "",
             "| configuration | τ | experts per module | trainable params | tokens/s, 2nd half | exact match "
             "(mean ± std) | the paper: params, tok/s, accuracy |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, tau, key, paper in rows:
        experts = (f"{mean_survivors(results, key):.2f}" if key.startswith("dmep")
                   else "8" if key == "lora-moe" else str(k) if key == sym else "–")
        speeds = [r["tokens_per_s_late"] for r in results[key] if r.get("tokens_per_s_late")]
        ref = DMEP_TABLE2.get(paper) if paper else None
        lines.append(f"| {name} | {tau} | {experts} | {_params(results, key)} | "
                     f"{statistics.mean(speeds):,.0f} | {_cell(scores(results, key))} | "
                     + (f"{'E=4: ' if paper == 'symmetric' else ''}{ref[0]}M, {ref[1]:,}, {ref[2]:.2f}% |"
                        if ref else "– |"))
    return "\n".join(lines)


TITLES = {"epng-fig3": "EPnG Fig. 3: ablation, rank sensitivity, prune-and-grow fraction",
          "epng-fig5": "EPnG Fig. 5: training loss of EPnG against LoRA",
          "dmep-table2": "DMEP Table II: the pruning threshold τ and the constrained symmetric baseline"}


def suite_rows(name: str) -> dict[str, Row]:
    """A suite's points and their runs (built when asked: dmep-table2's matched baseline comes after them)."""
    if name == "epng-fig3":
        return epng_fig3_rows()
    if name == "epng-fig5":
        return {"lora-r8": lora(), "epng-r8": epng()}
    return dmep_table2_rows()


TABLES = {"epng-fig3": epng_fig3_table, "epng-fig5": epng_fig5_table}  # (dmep-table2's also takes k)
