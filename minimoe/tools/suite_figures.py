"""The figures of ``minimoe reproduce --suite`` (matplotlib, the ``plot`` extra): each panel as the paper
draws it, with the mean over seeds and its standard deviation as error bars.

* ``epng-fig3``: ``fig3a_ablation.png`` (bars), ``fig3b_rank.png`` (LoRA and EPnG against the rank),
  ``fig3c_fraction.png`` (EPnG against alpha = beta, LoRA's band for reference);
* ``epng-fig5``: ``fig5_loss.png`` (every seed's loss, prune/grow events marked);
* ``dmep-table2``: ``table2_survivors.png`` (experts per module type after the prune, one bar per tau) and
  ``table2_tradeoff.png`` (accuracy against trainable parameters: the accuracy-efficiency trade-off).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..train.run_dir import RunDir
from . import suites as S


def _mean_std(results, key):
    return S.mean_std(S.scores(results, key))


def _fig3(plt, results, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    names = list(S.ABLATION)
    stats = [_mean_std(results, S.ABLATION[n]) for n in names]
    ax.bar(names, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4,
           color=["tab:gray", "tab:green", "tab:blue", "tab:orange"])
    ax.set_ylim(0.0, min(1.0, max(m + s for m, s in stats) + 0.1))  # bars from zero: their lengths compare
    ax.set_ylabel("tiny-arith exact match")
    ax.set_title("(a) ablation (rank 8)")
    paths = [_save(plt, fig, out / "fig3a_ablation.png")]

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, label, color in (("lora", "LoRA", "tab:gray"), ("epng", "EPnG", "tab:orange")):
        stats = [_mean_std(results, f"{method}-r{r}") for r in S.RANKS]
        ax.errorbar(S.RANKS, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                    label=label, color=color)
    ax.set_xscale("log", base=2)
    ax.set_xticks(S.RANKS, [str(r) for r in S.RANKS])
    ax.set_xlabel("LoRA rank (EPnG: its budget)")
    ax.set_ylabel("tiny-arith exact match")
    ax.set_title("(b) rank sensitivity")
    ax.legend()
    paths.append(_save(plt, fig, out / "fig3b_rank.png"))

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    stats = [_mean_std(results, S.fraction_key(f)) for f in S.FRACTIONS]
    ax.errorbar(S.FRACTIONS, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                color="tab:orange", label="EPnG")
    m, s = _mean_std(results, "lora-r8")
    ax.axhline(m, color="tab:gray", ls="--", label="LoRA (rank 8)")
    ax.axhspan(m - s, m + s, color="tab:gray", alpha=0.15)
    ax.set_xlabel("prune-and-grow fraction (alpha = beta)")
    ax.set_ylabel("tiny-arith exact match")
    ax.set_title("(c) prune-and-grow fraction")
    ax.legend()
    return [*paths, _save(plt, fig, out / "fig3c_fraction.png")]


def _fig5(plt, results, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for key, label, color in (("lora-r8", "LoRA", "tab:gray"), ("epng-r8", "EPnG", "tab:orange")):
        for i, r in enumerate(results[key]):
            metrics = RunDir(r["run"], writer=False).metrics()
            ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=0.8, color=color, alpha=0.7,
                    label=label if i == 0 else None)
    steps = sorted({step for r in results["epng-r8"] for step in S.prune_grow_steps(r["run"])})
    for i, step in enumerate(steps):
        ax.axvline(step, color="tab:red", ls=":", lw=0.9, label="prune/grow" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"training loss, every seed ({len(results['lora-r8'])} per method)")
    ax.legend()
    return [_save(plt, fig, out / "fig5_loss.png")]


def _table2(plt, results, out: Path, k: int) -> list[Path]:
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(S.TAUS)
    for i, tau in enumerate(S.TAUS):
        per_type = {t: [] for t in S.SEVEN}
        for r in results[S.tau_key(tau)]:
            for name, kept in S.survivors(r["run"]).items():
                per_type[name.rsplit(".", 1)[-1]].append(kept)
        ax.bar(np.arange(len(S.SEVEN)) + (i - (len(S.TAUS) - 1) / 2) * width,
               [statistics.mean(per_type[t]) if per_type[t] else 0 for t in S.SEVEN], width, label=f"τ = {tau:g}")
    ax.axhline(k, color="black", ls="--", lw=0.9, label=f"constrained symmetric (k = {k})")
    ax.set_xticks(range(len(S.SEVEN)), S.SEVEN)
    ax.set_ylabel("surviving experts (of 8)")
    ax.set_title("DMEP: experts per module type after the prune (mean over layers and seeds)")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    paths = [_save(plt, fig, out / "table2_survivors.png")]

    fig, ax = plt.subplots(figsize=(6, 4))
    points = [("dense LoRA", "dense-lora", "tab:gray"), ("symmetric E=8", "lora-moe", "tab:blue"),
              (f"symmetric E={k}", f"symmetric-k{k}", "tab:purple")]
    points += [(f"DMEP τ={t:g}", S.tau_key(t), c) for t, c in zip(S.TAUS, ("#fdae61", "#f46d43", "#d73027", "#a50026"))]
    for label, key, color in points:
        params = statistics.mean(r["trainable_parameters"] for r in results[key])
        m, s = _mean_std(results, key)
        ax.errorbar([params], [m], yerr=[s], marker="o", capsize=3, color=color, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (after the prune)")
    ax.set_ylabel("tiny-mix exact match")
    ax.set_title("accuracy against adapter size")
    ax.legend(fontsize=7)
    return [*paths, _save(plt, fig, out / "table2_tradeoff.png")]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw(name: str, results, out: Path, k: int | None = None) -> str:
    """Draw suite ``name``'s figures into ``out``; the markdown that shows them in ``table.md`` (or how to get
    them, without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return "(figures: pip install 'minimoe[plot]', then run the suite again with --reuse)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"epng-fig3": _fig3, "epng-fig5": _fig5}[name](plt, results, out) if name != "dmep-table2" \
        else _table2(plt, results, out, k)
    return "\n\n".join(f"![{p.stem}]({p.name})" for p in paths)
