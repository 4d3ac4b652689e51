"""The papers' comparison in miniature, offline: every policy on the embedded task, several seeds.

    python -m minimoe.reproduce --seeds 3            # ~15 minutes on 2 CPU cores

Runs ``train.py --policy P --seed S`` for lora, epng, dmep, esft and full on the shipped tiny model
and ``tiny-arith`` (lora and epng at the same LoRA budget: rank 8 on the experts' gate+up), scores
the test split (greedy exact match), and prints a table like the papers': trainable parameters,
training tokens/s, score mean ± std over seeds. Runs go to ``runs/reproduce/<policy>-seed<S>``, the
table to ``runs/reproduce/table.md``.

Earlier runs are never replaced silently: before anything starts, every run directory that already
holds files is either reused (``--reuse``, when it is a finished run with the same policy, seed and
steps) or replaced (``--overwrite``); otherwise the command stops and names them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from .files import write_text_atomic

POLICIES = ("lora", "epng", "dmep", "esft", "full")


def finished(out: Path, policy: str, seed: int, steps: int) -> dict | None:
    """The summary of a completed earlier run with the same policy, seed and steps, else None."""
    try:
        args = json.loads((out / "args.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    same = args.get("policy") == policy and args.get("seed") == seed and args.get("steps") == steps
    return summary if same else None


def occupied(out: Path) -> bool:
    """Whether ``out`` holds something train.py would refuse to write over (a non-empty directory or a file)."""
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def run_one(policy: str, seed: int, out: Path, extra: list[str], overwrite: bool = False) -> dict:
    """``train.py`` in a subprocess; ``--overwrite`` reaches it only when the user passed it here."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "train.py"), "--policy", policy, "--seed", str(seed), "--out", str(out),
           *(["--overwrite"] if overwrite else []), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| policy | trainable params | tokens/s | tiny-arith exact match (mean ± std) | seeds |",
             "|---|---:|---:|---:|---:|"]
    for policy, runs in results.items():
        scores = [r["task_score_after"] for r in runs]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        counts = sorted({r["trainable_parameters"] for r in runs})  # DMEP's survivors differ by seed
        trainable = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}–{counts[-1]:,}"
        lines.append(f"| {policy} | {trainable} | "
                     f"{statistics.mean(r['tokens_per_s'] for r in runs):,.0f} | "
                     f"{statistics.mean(scores):.3f} ± {std:.3f} | {len(runs)} |")
    base = [r["task_score_before"] for runs in results.values() for r in runs if r.get("task_score_before") is not None]
    if base:
        lines.append(f"\nbase model before fine-tuning: {statistics.mean(base):.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minimoe.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per policy (default 3)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    p.add_argument("--steps", type=int, default=300, help="steps per run (default 300, the embedded default's)")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs already under --out (same policy, seed and steps); run the rest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing run directories under --out (with --reuse: those it does not reuse)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        p.error(f"--seeds and --steps must be at least 1, got {args.seeds} and {args.steps}")
    extra = ["--steps", str(args.steps)]
    plan = [(policy, seed, args.out / f"{policy}-seed{seed}") for policy in args.policies
            for seed in range(args.seeds)]
    # decided before anything runs, so a refusal comes now rather than after minutes of training
    reused = {}
    for policy, seed, out in plan:
        summary = finished(out, policy, seed, args.steps) if args.reuse else None
        if summary is not None:
            reused[out] = summary
    blocked = [str(out) for _, _, out in plan if out not in reused and occupied(out)]
    if blocked and not args.overwrite:
        why = (" that --reuse cannot keep (not a finished run of the same policy, seed and steps)" if args.reuse
               else "")
        hint = "pass --overwrite to replace them" + ("" if args.reuse else ", or --reuse to keep finished runs")
        print(f"error: run directories under --out {args.out} already hold files{why}: {', '.join(blocked)}; "
              f"{hint} (nothing was run)", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {}
    for policy, seed, out in plan:
        summary = reused[out] if out in reused else run_one(policy, seed, out, extra, overwrite=args.overwrite)
        results.setdefault(policy, []).append(summary)
        print(f"{policy} seed {seed}: {summary['task_score_before']:.3f} -> {summary['task_score_after']:.3f} "
              f"({summary['trainable_parameters']:,} trainable, {summary['tokens_per_s']:,.0f} tok/s)", flush=True)
    text = table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "table.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
