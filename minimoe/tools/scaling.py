"""Data-parallel scaling: training throughput with 1, 2, ... processes on the same global batch.

    minimoe scaling                                  # epng on the shipped tiny model, 1 and 2 processes
    minimoe scaling --processes 1 2 4 --policy dmep --steps 40 --device cuda

Each count runs ``minimoe train`` (through ``torchrun --standalone`` above one process) for ``--steps`` steps with
the same global batch (``--global-batch``, split evenly) and reads the tokens/s the run reports (every
process's tokens, over the training loop, startup excluded). On a CPU the processes share the machine's
cores (``--threads`` in all, divided among them), so the table says what splitting the same cores into
processes costs or gains; on GPUs each process has its own device and the ideal is N×.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..train.run_dir import RunDir


def run(processes: int, args, out: Path) -> dict:
    """One training run on ``processes`` processes; its summary.json."""
    train = ["-m", "minimoe", "train", "--policy", args.policy, "--steps", str(args.steps), "--eval-limit", "0",
             "--batch-size", str(args.global_batch // processes), "--out", str(out), "--device", args.device,
             *(["--model", args.model] if args.model else []), *(["--fsdp"] if args.fsdp and processes > 1 else [])]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                             if processes > 1 else []), *train]
    threads = max(1, args.threads // processes) if args.device == "cpu" else args.threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{processes} process(es) failed:\n{proc.stderr[-3000:]}")
    return RunDir(out, writer=False).summary()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minimoe scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default: 1 2)")
    p.add_argument("--policy", default="epng", help="minimoe train --policy (default: epng)")
    p.add_argument("--model", default="", help="minimoe train --model (default: the shipped tiny-moe)")
    p.add_argument("--steps", type=int, default=30, help="training steps per run (default: 30)")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step over all processes (16)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all (default: all cores)")
    p.add_argument("--fsdp", action="store_true", help="shard the base (minimoe train --fsdp) above one process")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    bad = [n for n in args.processes if n < 1 or args.global_batch % n]
    if bad:
        p.error(f"--global-batch {args.global_batch} cannot be split evenly over {bad} processes")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            summary = run(n, args, Path(tmp) / str(n))
            rows.append({"processes": n, "batch_per_process": args.global_batch // n,
                         "tokens_per_s": summary["tokens_per_s"], "peak_memory_mb": summary.get("peak_memory_mb")})
    base = rows[0]["tokens_per_s"]
    print(f"{args.policy}{' --fsdp' if args.fsdp else ''}, {args.steps} steps, global batch {args.global_batch}, {args.device}, "
          f"{args.threads} threads in all")
    print(f"{'processes':>9}  {'batch each':>10}  {'tokens/s':>9}  {'vs first':>8}  peak memory per process (MB)")
    for r in rows:
        memory = ", ".join(f"{m:,.0f}" for m in r["peak_memory_mb"] or [])
        print(f"{r['processes']:>9}  {r['batch_per_process']:>10}  {r['tokens_per_s']:>9,.0f}  "
              f"{r['tokens_per_s'] / base:>7.2f}×  {memory}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
