"""Figures of a run directory (PNG), like the papers':

    python -m minimoe.plots runs/epng          # writes runs/epng/plots/*.png

* ``loss.png`` — training loss (and learning rate) per step;
* EPnG: ``epng_importance.png`` and ``epng_ranks.png`` — layer × expert heatmaps of the importance and
  the LoRA rank after the last prune/grow event (EPnG Fig. 4 and 6);
* DMEP: ``dmep_survivors.png`` — surviving experts per module, and ``dmep_gini.png`` — Gini per module
  over training (DMEP Fig. 2 and 6).

matplotlib is an optional extra (``pip install 'minimoe[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _heatmap(plt, matrix, title, label, out: Path, cmap="viridis") -> Path:
    fig, ax = plt.subplots(figsize=(max(4, len(matrix[0]) * 0.35), max(2.5, len(matrix) * 0.45)))
    im = ax.imshow(matrix, aspect="auto", cmap=cmap)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_run(run: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run / "plots"
    out.mkdir(exist_ok=True)
    written = []
    metrics = _lines(run / "metrics.jsonl")
    if metrics:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.plot([m["step"] for m in metrics], [m["lr"] for m in metrics], color="gray", lw=0.8, ls="--")
        ax2.set_ylabel("learning rate")
        ax.set_title(f"{run.name}: training loss")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=120)
        plt.close(fig)
        written.append(out / "loss.png")
    events = _lines(run / "events.jsonl")
    epng = [e for e in events if e["event"] == "prune_grow"]
    if epng:
        last = epng[-1]
        layers = sorted(last["ranks"], key=int)
        written.append(_heatmap(plt, [last["importance"][layer] for layer in layers],
                                f"expert importance at step {last['step']}", "mean router probability",
                                out / "epng_importance.png"))
        written.append(_heatmap(plt, [last["ranks"][layer] for layer in layers],
                                f"LoRA ranks after step {last['step']} ({len(epng)} events)", "rank",
                                out / "epng_ranks.png", cmap="magma"))
    prune = [e for e in events if e["event"] == "dmep_prune"]
    if prune:
        surv = prune[0]["survivors"]
        fig, ax = plt.subplots(figsize=(7, max(3, len(surv) * 0.18)))
        names = list(surv)
        ax.barh(range(len(names)), [len(surv[n]) for n in names])
        ax.set_yticks(range(len(names)), [n.replace("layers.", "L") for n in names], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("surviving experts")
        ax.set_title(f"DMEP survivors per module (pruned at step {prune[0]['step']})")
        fig.tight_layout()
        fig.savefig(out / "dmep_survivors.png", dpi=120)
        plt.close(fig)
        written.append(out / "dmep_survivors.png")
    routing = [e for e in events if e["event"] == "routing"]
    if routing:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name in routing[0]["modules"]:
            ax.plot([e["step"] for e in routing], [e["modules"][name]["gini"] for e in routing], lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("Gini of routing counts")
        ax.set_title("DMEP: Gini per module")
        fig.tight_layout()
        fig.savefig(out / "dmep_gini.png", dpi=120)
        plt.close(fig)
        written.append(out / "dmep_gini.png")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minimoe.plots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run directory written by train.py")
    args = p.parse_args(argv)
    if not (args.run / "metrics.jsonl").is_file():
        print(f"error: {args.run} is not a train.py run directory (no metrics.jsonl)", file=sys.stderr)
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
