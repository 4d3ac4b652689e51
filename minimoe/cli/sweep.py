"""``minimoe train --recipe SWEEP``: a paper's analysis at full scale, one run per point
(:mod:`minimoe.train.sweeps`).

    minimoe train --recipe dmep-table2-qwen3-0.6b-scienceqa --plan     # each point: its command, memory per GPU
    minimoe train --recipe dmep-table2-qwen3-0.6b-scienceqa            # run the points one after another
    minimoe train --recipe dmep-table2-qwen3-0.6b-scienceqa --point tau0.15 tau0.2 --batch-size 8 --grad-accum 16

Every point is a run of its own (``OUT/POINT``, default ``OUT`` runs/SWEEP), started as ``minimoe train
--recipe BASE FLAGS``: ``--plan`` prints those commands, with the evaluation after each, one line per point for
a scheduler. Flags other than ``--point``, ``--out``, ``--plan``, ``--gpu-memory`` and ``--overwrite`` go to
every point (e.g. a smaller batch with more accumulation). Running, a point whose directory holds a finished
run is kept, one that holds a checkpoint without a summary (preempted, killed) is resumed from it
(``--resume``); any other directory that already holds files is refused before anything starts, unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from ..train.checkpoint import read_info
from ..train.run_dir import RunDir
from ..train.sweeps import SWEEPS, Sweep


def _state(run: Path) -> str:
    """``finished`` (a summary), ``interrupted`` (a checkpoint, no summary: it resumes), ``held`` (other files) or
    ``new``."""
    d = RunDir(run, writer=False)
    try:
        if d.summary():
            return "finished"
        read_info(d.locate_checkpoint())
        return "interrupted"
    except (OSError, KeyError, ValueError):
        return "held" if d.occupied() else "new"


def _memory(sweep: Sweep, point: str, extra: list[str], gpu_memory: str | None) -> str:
    """The point's planned memory per GPU (``minimoe plan`` for the run's model, batch, length and dtype)."""
    from ..tools.plan import gib, parse_memory, plan
    from ..train.config import resolve

    recipe, flags = sweep.points[point]
    c = resolve(["--recipe", recipe, *flags, *extra])
    p = plan(c.model, c.policy, c.policy_options, c.batch_size, c.max_len, c.dtype, "cuda", c.gradient_checkpointing,
             1, c.fsdp, parse_memory(gpu_memory) if gpu_memory else None)
    verdict = "" if p.fits is None else (" (fits)" if p.fits else " (does NOT fit)")
    return f"{gib(p.total)} per GPU{verdict}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="minimoe train --recipe SWEEP", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, choices=SWEEPS)
    p.add_argument("--point", nargs="+", metavar="POINT", help="only these points (default all)")
    p.add_argument("--out", type=Path, help="parent of the points' run directories (default runs/SWEEP)")
    p.add_argument("--plan", action="store_true", help="print each point's commands and planned memory; run nothing")
    p.add_argument("--gpu-memory", help="with --plan: judge each point against this much memory (e.g. 80GB)")
    p.add_argument("--overwrite", action="store_true", help="replace the points' directories that hold unfinished runs")
    args, extra = p.parse_known_args(argv)
    sweep = SWEEPS[args.recipe]
    points = args.point or list(sweep.points)
    if unknown := [x for x in points if x not in sweep.points]:
        p.error(f"--point {' '.join(unknown)}: not a point of {sweep.name} (its points: {', '.join(sweep.points)})")
    if stray := [f for f in ("--resume", "--config") if f in extra]:
        p.error(f"{' and '.join(stray)} do not go with a sweep (each point is its own run)")
    out = args.out or Path("runs") / sweep.name
    runs = {x: out / x for x in points}
    if args.plan:
        print(f"{sweep.name}: {sweep.paper}; the paper: {sweep.reported}")
        for x in points:
            train = ["minimoe", "train", *sweep.command(x, str(runs[x]), tuple(extra))]
            recipe = sweep.points[x][0]
            score = ["minimoe", "eval", "--recipe", recipe, "--adapter", str(runs[x] / "adapter"), "--out",
                     str(runs[x] / "eval")]
            print(f"# {x}: {_memory(sweep, x, extra, args.gpu_memory)}\n{shlex.join(train)} && {shlex.join(score)}")
        return 0
    if args.gpu_memory:
        p.error("--gpu-memory goes with --plan")
    state = {x: _state(runs[x]) for x in points}
    held = [str(runs[x]) for x in points if state[x] == "held"]
    if held and not args.overwrite:
        print(f"error: {', '.join(held)} already hold files that are neither a finished run nor a checkpoint to "
              "resume; pass --overwrite to replace them (nothing was run)", file=sys.stderr)
        return 2
    for x in points:
        if state[x] == "finished":
            print(f"{sweep.name} / {x}: finished run in {runs[x]}, kept", flush=True)
            continue
        if state[x] == "interrupted":  # preempted or killed: it continues from its checkpoint, bit for bit
            cmd = [sys.executable, "-m", "minimoe", "train", "--resume", str(runs[x])]
        else:
            cmd = [sys.executable, "-m", "minimoe", "train", *sweep.command(x, str(runs[x]), tuple(extra)),
                   *(["--overwrite"] if args.overwrite else [])]
        print(f"{sweep.name} / {x}: {shlex.join(cmd[2:])}", flush=True)
        if code := subprocess.run(cmd).returncode:
            print(f"error: point {x} failed (exit {code}); the finished points are kept, rerun to continue",
                  file=sys.stderr)
            return code
    print(f"{sweep.name}: {len(points)} points in {out}; score each with: minimoe eval --recipe BASE --adapter "
          f"{out}/POINT/adapter (minimoe train --recipe {sweep.name} --plan prints them)")
    return 0
