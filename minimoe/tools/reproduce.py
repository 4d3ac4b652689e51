"""The papers' comparisons in miniature, offline: each paper's methods on the embedded task, several seeds.

    minimoe reproduce --seeds 3            # ~25 minutes on 2 CPU cores

Two tables, one per paper, each row ``minimoe train --policy P --seed S`` on ``tiny-arith`` (greedy exact match
on the test split):

* **EPnG** (its Table 2's methods) on the shipped tiny MoE ``tiny-moe``: ``lora`` and ``epng`` at the
  same LoRA budget (rank 8 on the experts' gate+up), ``epng-final`` (with Alg. 1's event at the last step,
  ``--epng-final-event``), ``esft`` and ``full``;
* **DMEP** (its Table I) on the shipped dense ``tiny-dense``, every row on all seven linears (q, k, v,
  o, gate, up, down): ``dense-lora`` (plain LoRA, rank 8), ``lora-moe`` (the symmetric LoRA-MoE: 8 experts
  per linear, LB loss on throughout, never pruned) and ``dmep`` (the same, pruned once at the end of the
  first epoch, LB loss off after). Besides the whole run's throughput it reports the second half's, when
  DMEP's pruned modules are in place (the paper's post-pruning throughput).

Runs go to ``runs/reproduce/<row>-seed<S>``, the tables to ``runs/reproduce/table.md``, which links the
figures of the first seed's epng and dmep runs (drawn into each run's ``plots/``; needs the ``plot`` extra).

Earlier runs are never replaced silently: before anything starts, every run directory that already
holds files is either reused (``--reuse``, when it is a finished run of the same row, seed and steps)
or replaced (``--overwrite``); otherwise the command stops and names them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..train.run_dir import RunDir
from ..utils.files import write_text_atomic

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Row:
    """One row of a table: a policy on a shipped model, with the flags that make it that paper's method."""

    policy: str
    model: str  # a shipped model (minimoe.model.shipped): tiny-moe or tiny-dense
    flags: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)  # policy_options a finished run of this row has in args.json

    def argv(self) -> list[str]:
        return ["--policy", self.policy, "--model", self.model, *self.flags]


ROWS = {
    "lora": Row("lora", "tiny-moe", options={"dense_targets": []}),
    "epng": Row("epng", "tiny-moe", options={"final_event": False}),
    "epng-final": Row("epng", "tiny-moe", ("--epng-final-event",), {"final_event": True}),  # Alg. 1 literally
    "esft": Row("esft", "tiny-moe"),
    "full": Row("full", "tiny-moe"),
    "dense-lora": Row("lora", "tiny-dense", ("--lora-dense-targets", *SEVEN), {"dense_targets": list(SEVEN)}),
    "lora-moe": Row("dmep", "tiny-dense", ("--dmep-prune-step", "-1"), {"prune_step": -1}),  # never pruned
    "dmep": Row("dmep", "tiny-dense", options={"prune_step": 0}),
}
TABLES = {"EPnG: expert LoRA on the tiny MoE (tiny-moe)": ("lora", "epng", "epng-final", "esft", "full"),
          "DMEP: all seven linears of the dense tiny model (tiny-dense)": ("dense-lora", "lora-moe", "dmep")}
POLICIES = tuple(ROWS)  # (the name --policies kept from when every row was a policy)


def finished(out: Path, row: str, seed: int, steps: int) -> dict | None:
    """The summary of a completed earlier run of the same row (policy, model, options), seed and steps, else None."""
    run = RunDir(out, writer=False)
    try:
        args, summary = run.args(), run.summary()
    except (OSError, ValueError):
        return None
    if not summary:
        return None
    spec = ROWS[row]
    options = args.get("policy_options", {})
    same = (args.get("policy") == spec.policy and args.get("seed") == seed and args.get("steps") == steps
            and Path(args.get("model", "")).name == spec.model
            and all(options.get(k) == v for k, v in spec.options.items()))
    return summary if same else None


def late_throughput(out: Path, steps: int) -> float | None:
    """Training tokens/s over the second half of a run (``metrics.jsonl``: per-step tokens, cumulative time)."""
    try:
        metrics = RunDir(out, writer=False).metrics()
    except (OSError, ValueError):
        return None
    half = [m for m in metrics if m["step"] > steps // 2]
    start = [m["elapsed_s"] for m in metrics if m["step"] == steps // 2]
    if not half or not start or half[-1]["elapsed_s"] <= start[0]:
        return None
    return sum(m["tokens"] for m in half) / (half[-1]["elapsed_s"] - start[0])


def run_one(row: str, seed: int, out: Path, steps: int, overwrite: bool = False) -> dict:
    """``minimoe train`` in a subprocess (this interpreter's minimoe); ``--overwrite`` reaches it only when the
    user passed it here."""
    cmd = [sys.executable, "-m", "minimoe", "train", *ROWS[row].argv(), "--steps", str(steps), "--seed", str(seed),
           "--out", str(out), *(["--overwrite"] if overwrite else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return RunDir(out, writer=False).summary()


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def table(results: dict[str, list[dict]]) -> str:
    """One markdown table per paper, of the rows in ``results`` (row name -> summaries of its seeds; a summary
    may carry ``tokens_per_s_late``, the second half's throughput, shown in the DMEP table)."""
    out = []
    for title, rows in TABLES.items():
        rows = [r for r in rows if r in results]
        if not rows:
            continue
        late = "DMEP" in title
        out += [f"**{title}**", "",
                "| method | trainable params | tokens/s" + (" | tokens/s, 2nd half" if late else "")
                + " | tiny-arith exact match (mean ± std) | seeds |",
                "|---|---:|---:|" + ("---:|" if late else "") + "---:|---:|"]
        for row in rows:
            runs = results[row]
            counts = sorted({r["trainable_parameters"] for r in runs})  # DMEP's survivors differ by seed
            trainable = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}–{counts[-1]:,}"
            cells = [row, trainable, f"{statistics.mean(r['tokens_per_s'] for r in runs):,.0f}"]
            if late:
                speeds = [r["tokens_per_s_late"] for r in runs if r.get("tokens_per_s_late")]
                cells.append(f"{statistics.mean(speeds):,.0f}" if speeds else "–")
            cells += [_mean_std([r["task_score_after"] for r in runs]), str(len(runs))]
            out.append("| " + " | ".join(cells) + " |")
        base = [r["task_score_before"] for row in rows for r in results[row] if r.get("task_score_before") is not None]
        if base:
            out.append(f"\nbase model before fine-tuning: {statistics.mean(base):.3f}")
        out.append("")
    return "\n".join(out).rstrip()


FIGURES = ("epng", "dmep")  # the rows whose first seed's figures the table links (minimoe plots)


def figures(root: Path, runs: list[Path]) -> str:
    """Draw each run's figures (``RUN/plots``) and return the markdown lines that link them from ``table.md``;
    nothing (and a note) without matplotlib."""
    try:
        from .plots import plot_run

        import matplotlib  # noqa: F401
    except ImportError:
        return "\n\n(figures: pip install 'minimoe[plot]', then minimoe plots RUN)" if runs else ""
    lines = []
    for run in runs:
        drawn = [p for p in plot_run(run) if p.suffix == ".png"]
        links = ", ".join(f"[{p.stem}]({p.relative_to(root)})" for p in drawn)
        lines.append(f"* {run.name}: {links} ([all, with the run's summary]({(run / 'plots' / 'index.md').relative_to(root)}))")
    return "\n\nFigures (seed 0):\n\n" + "\n".join(lines) if lines else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minimoe reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (default 3)")
    p.add_argument("--policies", "--rows", nargs="+", default=list(ROWS), choices=ROWS, metavar="ROW",
                   help="rows to run (default all: " + ", ".join(ROWS) + ")")
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    p.add_argument("--steps", type=int, default=300, help="steps per run (default 300, the embedded default's)")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs already under --out (same row, seed and steps); run the rest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing run directories under --out (with --reuse: those it does not reuse)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        p.error(f"--seeds and --steps must be at least 1, got {args.seeds} and {args.steps}")
    plan = [(row, seed, args.out / f"{row}-seed{seed}") for row in args.policies for seed in range(args.seeds)]
    # decided before anything runs, so a refusal comes now rather than after minutes of training
    reused = {}
    for row, seed, out in plan:
        summary = finished(out, row, seed, args.steps) if args.reuse else None
        if summary is not None:
            reused[out] = summary
    blocked = [str(out) for _, _, out in plan if out not in reused and RunDir(out, writer=False).occupied()]
    if blocked and not args.overwrite:
        why = (" that --reuse cannot keep (not a finished run of the same row, seed and steps)" if args.reuse
               else "")
        hint = "pass --overwrite to replace them" + ("" if args.reuse else ", or --reuse to keep finished runs")
        print(f"error: run directories under --out {args.out} already hold files{why}: {', '.join(blocked)}; "
              f"{hint} (nothing was run)", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {}
    for row, seed, out in plan:
        summary = reused[out] if out in reused else run_one(row, seed, out, args.steps, overwrite=args.overwrite)
        summary = {**summary, "tokens_per_s_late": late_throughput(out, args.steps)}
        results.setdefault(row, []).append(summary)
        print(f"{row} seed {seed}: {summary['task_score_before']:.3f} -> {summary['task_score_after']:.3f} "
              f"({summary['trainable_parameters']:,} trainable, {summary['tokens_per_s']:,.0f} tok/s)", flush=True)
    text = table(results) + figures(args.out, [out for row, seed, out in plan if seed == 0 and row in FIGURES])
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "table.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
