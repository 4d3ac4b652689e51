"""Figures of a run directory (PNG), like the papers', and an index that shows them with the run's summary:

    minimoe plots runs/epng          # writes runs/epng/plots/*.png and runs/epng/plots/index.md

* ``loss.png`` — training loss and learning rate per step, every event marked (prune/grow, DMEP's prune,
  a stretched schedule);
* EPnG: ``epng_importance.png`` and ``epng_ranks.png`` — layer × expert heatmaps of the importance and the
  LoRA rank after the last prune/grow event (EPnG Fig. 5); ``epng_prune_grow.png`` — experts pruned and
  grown per layer at every event (Fig. 4); ``epng_importance_shift.png`` — importance of each expert in the
  base model against the fine-tuned one on the same probe batches, which the run measures at its start and
  end (``--epng-probe-batches``; Fig. 6 / App. D);
* DMEP: ``dmep_survivors.png`` — surviving experts per layer × module (Fig. 6); ``dmep_gini.png`` — Gini of
  the routing counts per module type over training (Fig. 2); ``dmep_routing.png`` — normalised routing
  entropy and drift over training, the load-balancing loss on until the prune and off after (Fig. 3).

Everything is read from ``metrics.jsonl`` and ``events.jsonl``. matplotlib is an optional extra
(``pip install 'minimoe[plot]'``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from ..train.run_dir import RunDir

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EVENT_STYLE = {"prune_grow": ("tab:orange", "--", "prune/grow"), "dmep_prune": ("tab:red", "-", "DMEP prune"),
               "schedule": ("tab:gray", ":", "schedule stretched")}


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _heatmap(plt, matrix, title, label, out: Path, xlabel="expert", ylabel="MoE layer", xticks=None,
             yticks=None, cmap="viridis", counts=False) -> Path:
    """``counts``: integer cells, written in each cell, with an integer colour scale."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(max(5.5, len(matrix[0]) * 0.6), max(2.8, len(matrix) * 0.45)))
    im = ax.imshow(matrix, aspect="auto", cmap=cmap)
    if counts:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v == v:  # not NaN (a module that has no LoRA-MoE)
                    ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticks is not None:
        long = len(xticks) > 8 or any(len(str(t)) > 3 for t in xticks)
        ax.set_xticks(range(len(xticks)), xticks, fontsize=7, rotation=35 if long else 0,
                      ha="right" if long else "center")
    if yticks is not None:
        ax.set_yticks(range(len(yticks)), yticks, fontsize=7)
    ax.set_title(title)
    bar = fig.colorbar(im, ax=ax, label=label)
    if counts:
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    return _save(plt, fig, out)


def _loss(plt, run: Path, metrics: list[dict], events: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=1, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot([m["step"] for m in metrics], [m["lr"] for m in metrics], color="gray", lw=0.8, ls="--")
    ax2.set_ylabel("learning rate (dashed)")
    labelled = set()
    for e in events:
        if e["event"] in EVENT_STYLE:
            color, style, label = EVENT_STYLE[e["event"]]
            ax.axvline(e["step"], color=color, ls=style, lw=0.9, label=None if label in labelled else label)
            labelled.add(label)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"{run.name}: training loss, events marked")
    return _save(plt, fig, out)


def _epng(plt, events: list[dict], out: Path) -> list[Path]:
    from matplotlib.ticker import MaxNLocator

    written = []
    epng = [e for e in events if e["event"] == "prune_grow"]
    if epng:
        last = epng[-1]
        layers = sorted(last["ranks"], key=int)
        written.append(_heatmap(plt, [last["importance"][layer] for layer in layers],
                                f"expert importance at step {last['step']}", "mean router probability",
                                out / "epng_importance.png", yticks=layers))
        written.append(_heatmap(plt, [last["ranks"][layer] for layer in layers],
                                f"LoRA ranks after step {last['step']} ({len(epng)} events)", "rank",
                                out / "epng_ranks.png", cmap="magma", yticks=layers, counts=True))
        steps = [e["step"] for e in epng]
        pruned = [[sum(1 for l, _ in e["pruned"] if str(l) == layer) for e in epng] for layer in layers]
        grown = [[sum(1 for l, _, _ in e["grown"] if str(l) == layer) for e in epng] for layer in layers]
        fig, axes = plt.subplots(1, 2, figsize=(max(7, len(steps) * 1.1), max(2.6, len(layers) * 0.5)),
                                 sharey=True)
        for ax, matrix, title, cmap in ((axes[0], pruned, "experts pruned", "Reds"),
                                        (axes[1], grown, "experts grown", "Greens")):
            im = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=0)
            ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
            ax.set_xlabel("event (step)")
            ax.set_title(title)
            for i, row in enumerate(matrix):
                for j, v in enumerate(row):
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
            fig.colorbar(im, ax=ax, ticks=MaxNLocator(integer=True))
        axes[0].set_yticks(range(len(layers)), layers)
        axes[0].set_ylabel("MoE layer")
        written.append(_save(plt, fig, out / "epng_prune_grow.png"))
    probes = {e["model"]: e for e in events if e["event"] == "importance_probe"}
    if {"base", "fine-tuned"} <= set(probes):
        base, tuned = probes["base"]["importance"], probes["fine-tuned"]["importance"]
        final = epng[-1]["ranks"] if epng else {}
        fig, ax = plt.subplots(figsize=(4.8, 4.4))
        for layer in sorted(base, key=int):
            ranks = final.get(layer)
            colors = None if ranks is None else ["tab:red" if r == 0 else "tab:green" if r > min(
                [x for x in ranks if x] or [0]) else "tab:blue" for r in ranks]
            ax.scatter(base[layer], tuned[layer], s=14, c=colors, alpha=0.8)
        top = max(max(v) for v in (*base.values(), *tuned.values()))
        ax.plot([0, top], [0, top], color="gray", lw=0.8, ls=":")
        ax.set_xlabel("importance in the base model")
        ax.set_ylabel("importance after fine-tuning")
        ax.set_title(f"expert importance on {probes['base']['batches']} probe batches\n"
                     "red: adapter pruned, green: grown, blue: kept", fontsize=9)
        written.append(_save(plt, fig, out / "epng_importance_shift.png"))
    return written


def _module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "layers" else name


def _dmep(plt, events: list[dict], out: Path) -> list[Path]:
    written = []
    prune = [e for e in events if e["event"] == "dmep_prune"]
    if prune:
        surv = prune[0]["survivors"]
        types = [t for t in MODULES if any(_module_type(n) == t for n in surv)]
        layers = sorted({_layer(n) for n in surv}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else s))
        count = {(_layer(n), _module_type(n)): len(s) for n, s in surv.items()}
        matrix = [[count.get((layer, t), float("nan")) for t in types] for layer in layers]
        path = _heatmap(plt, matrix, f"DMEP: surviving experts (pruned at step {prune[0]['step']})", "experts",
                        out / "dmep_survivors.png", xlabel="module", ylabel="layer", xticks=types, yticks=layers,
                        cmap="viridis", counts=True)
        written.append(path)
    routing = [e for e in events if e["event"] == "routing"]
    if routing:
        steps = [e["step"] for e in routing]
        names = list(routing[0]["modules"])
        types = [t for t in MODULES if any(_module_type(n) == t for n in names)]

        def mean_of(metric: str, t: str | None = None) -> list[float]:
            values = []
            for e in routing:
                xs = [v[metric] for n, v in e["modules"].items()
                      if (t is None or _module_type(n) == t) and v[metric] == v[metric]]  # NaN: no interval yet
                values.append(statistics.fmean(xs) if xs else float("nan"))
            return values

        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for t in types:
            ax.plot(steps, mean_of("gini", t), lw=1, label=t)
        if prune:
            ax.axvline(prune[0]["step"], color="tab:red", lw=0.9, ls="--", label="prune")
        ax.set_xlabel("step")
        ax.set_ylabel("Gini of routing counts (mean over layers)")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("DMEP: routing imbalance per module type")
        written.append(_save(plt, fig, out / "dmep_gini.png"))
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        ax.plot(steps, mean_of("entropy"), lw=1.2, label="normalised entropy")
        ax.plot(steps, mean_of("drift"), lw=1.2, label="drift (L1, consecutive intervals)")
        if prune:
            p = prune[0]["step"]
            ax.axvspan(0, p, color="tab:blue", alpha=0.08, label="load-balancing loss on")
            ax.axvline(p, color="tab:red", lw=0.9, label=f"prune (step {p}), LB loss off")
        ax.set_xlabel("step")
        ax.set_ylabel("mean over modules")
        ax.legend(fontsize=7)
        ax.set_title("DMEP: routing entropy and drift")
        written.append(_save(plt, fig, out / "dmep_routing.png"))
    return written


def _index(run: Path, out: Path, written: list[Path]) -> Path:
    """``plots/index.md``: the run's summary and every figure (a README-style page)."""
    summary = RunDir(run, writer=False).summary()
    keep = ("policy", "model", "steps", "final_loss", "trainable_parameters", "tokens_per_s", "events",
            "task_score_before", "task_score_after")
    def cell(v) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return str(v)
        return f"{v:,}" if isinstance(v, int) else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"

    rows = [f"| {k} | {cell(summary[k])} |" for k in keep if k in summary]
    text = [f"# {run.name}", "", "| | |", "|---|---|", *rows, ""]
    text += [f"![{p.stem}]({p.name})" for p in written]
    path = out / "index.md"
    path.write_text("\n".join(text) + "\n")
    return path


def plot_run(run: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run / "plots"
    out.mkdir(exist_ok=True)
    written = []
    metrics, events = RunDir(run, writer=False).metrics(), RunDir(run, writer=False).events()
    if metrics:
        written.append(_loss(plt, run, metrics, events, out / "loss.png"))
    written += _epng(plt, events, out)
    written += _dmep(plt, events, out)
    return [*written, _index(run, out, written)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minimoe plots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run directory written by minimoe train")
    args = p.parse_args(argv)
    if not RunDir(args.run, writer=False).is_run():
        print(f"error: {args.run} is not a run directory of minimoe train (no metrics.jsonl)", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib: pip install 'minimoe[plot]' (or pip install matplotlib)",
              file=sys.stderr)
        return 2
    for path in plot_run(args.run):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
