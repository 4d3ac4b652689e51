"""One ``minimoe train`` run per point of a table or sweep, in a subprocess: the plan, what ``--reuse`` may
keep, what must be refused before anything starts, and each run's summary (``minimoe reproduce``)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..train.run_dir import RunDir


@dataclass(frozen=True)
class Row:
    """One row of a table (or point of a sweep): a policy on a shipped model and a built-in task, with the
    policy options that make it that paper's method (given as ``--POLICY-OPTION`` flags, and checked in a
    finished run's ``args.json`` before it is reused)."""

    policy: str
    model: str  # a shipped model (minimoe.model.shipped): tiny-moe or tiny-dense
    options: dict = field(default_factory=dict)
    data: str = "tiny-arith"  # a built-in task (minimoe.data.builtin)
    train: tuple[str, ...] = ()  # other minimoe train flags, which do not change a run that finishes

    def argv(self) -> list[str]:
        flags = ["--policy", self.policy, "--model", self.model, "--data", self.data, *self.train]
        for key, value in self.options.items():
            flag = f"--{self.policy}-{key.replace('_', '-')}"
            if value is True:
                flags.append(flag)
            elif isinstance(value, (list, tuple)):
                flags += [flag, *map(str, value)] if value else []
            elif value is not False:
                flags += [flag, str(value)]
        return flags


def finished(out: Path, row: Row, seed: int, steps: int, eval_limit: int = 100) -> dict | None:
    """The summary of a completed earlier run of the same row (policy, model, task, options), seed, steps and
    number of test problems scored, else None."""
    run = RunDir(out, writer=False)
    try:
        args, summary = run.args(), run.summary()
    except (OSError, ValueError):
        return None
    if not summary:
        return None
    options = args.get("policy_options", {})
    same = (args.get("policy") == row.policy and args.get("seed") == seed and args.get("steps") == steps
            and Path(args.get("model", "")).name == row.model and args.get("data") == row.data
            and args.get("eval_limit") == eval_limit
            and all(json.dumps(options.get(k)) == json.dumps(list(v) if isinstance(v, tuple) else v)
                    for k, v in row.options.items()))
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


def run_one(row: Row, seed: int, out: Path, steps: int, overwrite: bool = False, eval_limit: int = 100) -> dict:
    """``minimoe train`` in a subprocess (this interpreter's minimoe); ``--overwrite`` reaches it only when the
    user passed it here."""
    cmd = [sys.executable, "-m", "minimoe", "train", *row.argv(), "--steps", str(steps), "--seed", str(seed),
           "--eval-limit", str(eval_limit), "--out", str(out), *(["--overwrite"] if overwrite else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return RunDir(out, writer=False).summary()


Plan = list[tuple[str, Row, int, Path]]  # (row name, row, seed, run directory)


def check_plan(plan: Plan, steps: int, reuse: bool, overwrite: bool, out: Path,
               eval_limit: int = 100) -> tuple[dict[Path, dict], str | None]:
    """Decided before anything runs, so a refusal comes now rather than after minutes of training: the
    summaries of the runs ``--reuse`` keeps, and the refusal (an error line) when other run directories
    already hold files and ``--overwrite`` was not given."""
    reused = {}
    for _, row, seed, run in plan:
        summary = finished(run, row, seed, steps, eval_limit) if reuse else None
        if summary is not None:
            reused[run] = summary
    blocked = [str(run) for *_, run in plan if run not in reused and RunDir(run, writer=False).occupied()]
    if not blocked or overwrite:
        return reused, None
    why = (" that --reuse cannot keep (not a finished run of the same row, seed and steps)" if reuse else "")
    hint = "pass --overwrite to replace them" + ("" if reuse else ", or --reuse to keep finished runs")
    return reused, (f"error: run directories under --out {out} already hold files{why}: {', '.join(blocked)}; "
                    f"{hint} (nothing was run)")


def run_plan(plan: Plan, reused: dict[Path, dict], steps: int, overwrite: bool,
             eval_limit: int = 100) -> dict[str, list[dict]]:
    """Run (or reuse) every run of ``plan``, printing a line each: row name -> the summaries of its seeds, each
    with ``tokens_per_s_late`` (the second half's throughput) and ``run`` (its directory) added."""
    results: dict[str, list[dict]] = {}
    for name, row, seed, run in plan:
        summary = reused[run] if run in reused else run_one(row, seed, run, steps, overwrite, eval_limit)
        summary = {**summary, "tokens_per_s_late": late_throughput(run, steps), "run": run, "seed": seed}
        results.setdefault(name, []).append(summary)
        print(f"{name} seed {seed}: {summary['task_score_before']:.3f} -> {summary['task_score_after']:.3f} "
              f"({summary['trainable_parameters']:,} trainable, {summary['tokens_per_s']:,.0f} tok/s"
              f"{', reused' if run in reused else ''})", flush=True)
    return results


def run_minutes(run: Path) -> float:
    """How long a finished run took, from its arguments written at the start to its summary written at the end
    (its score included): what a reused run cost when it ran."""
    return ((run / "summary.json").stat().st_mtime - (run / "args.json").stat().st_mtime) / 60
