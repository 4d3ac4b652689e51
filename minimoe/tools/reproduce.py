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

The papers' analyses (EPnG Fig. 3 and 5, DMEP Table II) are suites of their own, each in its own output
directory (:mod:`minimoe.tools.suites`)::

    minimoe reproduce --suite epng-fig3 --seeds 3     # runs/reproduce/epng-fig3/table.md and figures
    minimoe reproduce --suite dmep-table2 --seeds 3

Earlier runs are never replaced silently: before anything starts, every run directory that already
holds files is either reused (``--reuse``, when it is a finished run of the same row, seed, steps, task
and number of test problems) or replaced (``--overwrite``); otherwise the command stops and names them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from ..train.recipes import SEVEN
from ..train.run_dir import RunDir
from ..utils.files import write_text_atomic
from . import suites
from .runs import Row, check_plan, run_minutes, run_plan
from .suite_figures import draw



ROWS = {
    "lora": Row("lora", "tiny-moe", {"dense_targets": []}),
    "epng": Row("epng", "tiny-moe", {"final_event": False}),
    "epng-final": Row("epng", "tiny-moe", {"final_event": True}),  # Alg. 1 literally
    "esft": Row("esft", "tiny-moe"),
    "full": Row("full", "tiny-moe"),
    "dense-lora": Row("lora", "tiny-dense", {"dense_targets": list(SEVEN)}),
    "lora-moe": Row("dmep", "tiny-dense", {"prune_step": -1}),  # never pruned
    "dmep": Row("dmep", "tiny-dense", {"prune_step": 0}),
}
TABLES = {"EPnG: expert LoRA on the tiny MoE (tiny-moe)": ("lora", "epng", "epng-final", "esft", "full"),
          "DMEP: all seven linears of the dense tiny model (tiny-dense)": ("dense-lora", "lora-moe", "dmep")}
POLICIES = tuple(ROWS)  # (the name --policies kept from when every row was a policy)


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


def _plan(rows: dict[str, Row], seeds: int, out: Path):
    return [(key, row, seed, out / f"{key}-seed{seed}") for key, row in rows.items() for seed in range(seeds)]


def run_suite(name: str, out: Path, seeds: int, steps: int, reuse: bool, overwrite: bool) -> int:
    """Run (or reuse) every point of an analysis (:mod:`minimoe.tools.suites`), then write ``OUT/table.md``
    and its figures."""
    start = time.monotonic()
    plan = _plan(suites.suite_rows(name), seeds, out)
    limit = suites.EVAL_LIMIT
    reused, refusal = check_plan(plan, steps, reuse, overwrite, out, limit)
    matched = name == "dmep-table2"  # its constrained symmetric baseline: k is known after DMEP's runs
    held = [str(p) for p in sorted(out.glob("symmetric-k*-seed*")) if RunDir(p, writer=False).occupied()] \
        if matched and not (reuse or overwrite) else []
    if held and not refusal:
        refusal = (f"error: run directories under --out {out} already hold files: {', '.join(held)}; pass --reuse "
                   "to keep finished runs or --overwrite to replace them (nothing was run)")
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    results = run_plan(plan, reused, steps, overwrite, limit)
    k = None
    if matched:
        k = max(2, round(suites.mean_survivors(results, suites.tau_key(suites.DEFAULT_TAU))))
        second = _plan({f"symmetric-k{k}": suites.symmetric(k)}, seeds, out)
        reused2, refusal = check_plan(second, steps, reuse, overwrite, out, limit)
        if refusal:
            print(refusal, file=sys.stderr)
            return 2
        results |= run_plan(second, reused2, steps, overwrite, limit)
        plan, reused = plan + second, reused | reused2
    text = suites.dmep_table2_table(results, k) if matched else suites.TABLES[name](results)
    figures = draw(name, results, out, k)
    minutes = (time.monotonic() - start) / 60
    spent = sum(run_minutes(run) for *_, run in plan)
    text = (f"# {suites.TITLES[name]}\n\n{text}\n\n{figures}\n\n{len(plan)} runs ({len(reused)} reused), {steps} steps "
            f"each, {seeds} seed{'s' if seeds > 1 else ''}: {minutes:.1f} minutes; the runs took {spent:.1f} minutes "
            "in all, each from its start to its score\n")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "table.md", text)
    print(text)
    return 0


SUITES = ("tables", *suites.TITLES)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minimoe reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="tables", choices=SUITES,
                   help="tables: each paper's main table (default); epng-fig3, epng-fig5, dmep-table2: the papers' "
                        "analyses (minimoe/tools/suites.py)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (default 3)")
    p.add_argument("--policies", "--rows", nargs="+", choices=ROWS, metavar="ROW",
                   help="rows of the tables to run (default all: " + ", ".join(ROWS) + ")")
    p.add_argument("--out", type=Path, help="default runs/reproduce (a suite: runs/reproduce/SUITE)")
    p.add_argument("--steps", type=int, default=300, help="steps per run (default 300, the embedded default's)")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs already under --out (same row, seed and steps); run the rest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing run directories under --out (with --reuse: those it does not reuse)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        p.error(f"--seeds and --steps must be at least 1, got {args.seeds} and {args.steps}")
    if args.suite != "tables":
        if args.policies:
            p.error(f"--policies chooses rows of the tables; --suite {args.suite} runs all of its points")
        out = args.out or Path("runs/reproduce") / args.suite
        return run_suite(args.suite, out, args.seeds, args.steps, args.reuse, args.overwrite)
    out = args.out or Path("runs/reproduce")
    rows = args.policies or list(ROWS)
    plan = [(row, ROWS[row], seed, out / f"{row}-seed{seed}") for row in rows for seed in range(args.seeds)]
    reused, refusal = check_plan(plan, args.steps, args.reuse, args.overwrite, out)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    results = run_plan(plan, reused, args.steps, args.overwrite)
    text = table(results) + figures(out, [run for row, _, seed, run in plan if seed == 0 and row in FIGURES])
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "table.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
