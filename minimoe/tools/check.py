"""GPU self-check: one command that tells whether minimoe computes and trains correctly on this machine.

    minimoe check --device cuda          # the full check, a few minutes on one GPU
    minimoe check --device cpu --quick   # the same checks, small (what CI runs)

Checks, in order (each prints PASS, FAIL or SKIP with what it measured and the tolerance it used):

1. ``parity <preset>``: the four families' tiny presets on the device (fp32, bf16) against the same weights
   on the CPU in fp32; ``transformers <preset>``: against transformers' model of the same checkpoint on
   the same device (SKIP without transformers);
2. ``expert paths fp32|bf16``: the grouped_mm and per-expert loop paths agree, forward and gradients;
   ``lora skip path``: ResizableLoRAExpert with more than half its experts pruned, skip path vs packed vs loop;
3. ``adapter gradients``: LoRALinear, ResizableLoRAExpert and PrunableLoRAMoE gradients on the device vs
   CPU fp32; ``grow/shrink state``: grow then shrink keeps parameters and AdamW state bit for bit;
4. ``compiled blocks``: ``--compile``'s blocks against the eager ones through a grow and a prune; ``packed
   attention``: FlexAttention on packed rows against SDPA's block mask (``check_compile.py``);
5. ``epng resume``: a 6-step EPnG run on the shipped tiny model (events at steps 2 and 4) stopped at step
   3 and resumed, against the uninterrupted run (bit-equal on the CPU; on CUDA, whose reductions vary run
   to run, losses and the LoRA B matrices within the tolerances below);
6. ``benchmark``: ``minimoe bench`` (``olmoe-layer`` on CUDA, ``tiny`` on the CPU; a few small
   steps with ``--quick``): tokens/s of minimoe's expert LoRA next to transformers+PEFT, and the ratios.

The exit code is 1 if any check FAILs (an exception inside a check is a FAIL with its message).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ..model.shipped import shipped
from ..train.run_dir import RunDir
from . import check_compile, check_numerics as num
from .check_numerics import Result

FAMILIES = ("tiny-olmoe", "tiny-qwen2-moe", "tiny-qwen3", "tiny-qwen3-moe")
# CUDA resume vs uninterrupted (CUDA's atomics make reductions vary run to run, so bit equality is not
# required there; on the CPU everything must be exactly equal):
RESUME_CUDA_TOL = 1e-2  # ||B_full - B_resumed|| / ||B_full|| over the LoRA B matrices (all start at 0, so
# ||B_full|| is what training moved): noise flips a few near-zero Adam updates (~lr each); a resume that
# restores the wrong data, state or layout moves B by as much as training did (ratio ~1)
LOSS_CUDA_REL_TOL = 1e-4  # per-step training losses, relative (a lost optimizer state: 1.8e-4 on the CPU)
BENCH_ROUTES = {  # label -> bench route; the ratio is minimoe over each transformers+PEFT route
    "minimoe": "minimoe expert LoRA r=8 gate+up",
    "PEFT grouped_mm": "transformers+PEFT LoRA r=8 gate+up (grouped_mm experts)",
    "PEFT eager": "transformers+PEFT LoRA r=8 gate+up (eager experts)",
}


# --- 4. EPnG with stop and resume ------------------------------------------------------------------------
def epng_resume(device: str, quick: bool) -> Result:
    """EPnG for 6 steps (prune/grow at 2 and 4), stopped after step 3 and resumed, against one run."""
    from safetensors.torch import load_file

    from ..train.config import TrainConfig
    from ..train.trainer import Trainer

    model = str(shipped("tiny-moe"))  # an install without it fails here, naming what is missing
    with tempfile.TemporaryDirectory() as tmp:
        def config(name, **kw):
            return TrainConfig(policy="epng", model=model, steps=6, batch_size=2, max_len=64, eval_limit=0,
                               device=device, policy_options={"warmup": 2, "interval": 2, "probe_batches": 1},
                               **({"out": str(Path(tmp) / name)} if name else {}), **kw)

        with contextlib.redirect_stdout(io.StringIO()):
            Trainer(config("full"), show_progress=False).train()
            Trainer(config("half", stop_at=3), show_progress=False).train()
            Trainer(config(None, resume=str(Path(tmp) / "half")), show_progress=False).train()
        runs = {name: Path(tmp) / name for name in ("full", "half")}
        weights = {n: load_file(str(d / "checkpoint" / "model.safetensors")) for n, d in runs.items()}
        events = {n: RunDir(d, writer=False).events() for n, d in runs.items()}
        losses = {n: [m["loss"] for m in RunDir(d, writer=False).metrics()] for n, d in runs.items()}
    a, b = weights["full"], weights["half"]
    if a.keys() != b.keys():
        return Result("FAIL", f"resumed adapter layout differs: {sorted(a.keys() ^ b.keys())[:3]}")
    diff = max((float((a[k].float() - b[k].float()).abs().max()) for k in a), default=0.0)
    bs = [k for k in a if ".B." in k or k.endswith("lora_B")]
    moved = float(torch.cat([a[k].float().flatten() for k in bs]).norm())
    ratio = float(torch.cat([(a[k].float() - b[k].float()).flatten() for k in bs]).norm()) / max(moved, 1e-30)
    loss_rel = max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(losses["full"], losses["half"], strict=True))
    events_after = [e for e in events["half"] if e.get("event") == "prune_grow" and e.get("step", 0) > 3]
    if not events_after:
        return Result("FAIL", "no prune/grow event after the resume at step 3")
    exact = not device.startswith("cuda")
    differ = _first_difference(events["full"], events["half"], exact)
    where = "tiny-moe"
    if exact:
        ok, tol = diff == 0.0 and loss_rel == 0.0, "weights and losses must be exactly equal on the CPU"
    else:
        ok = ratio <= RESUME_CUDA_TOL and loss_rel <= LOSS_CUDA_REL_TOL
        tol = f"tol: B ratio {RESUME_CUDA_TOL:g}, losses {LOSS_CUDA_REL_TOL:g}"
    same = ("identical" if exact else "equal to rel 1e-4") if differ is None else f"DIFFER at {differ}"
    return num.verdict(ok and differ is None and len(losses["half"]) == 6,
                       f"{where}, {len(a)} tensors: max diff {diff:.1e}, B diff/B {ratio:.1e}, losses max rel "
                       f"{loss_rel:.1e} ({tol}); {len(events['full'])} events {same}")


def _first_difference(a, b, exact: bool, where: str = "") -> str | None:
    """Where two events logs differ (None if nowhere): exactly, or with floats equal to a relative 1e-4 (CUDA's
    reductions need not match the uninterrupted run's bit for bit); wall-clock fields (``*_s``) are skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in a.keys() | b.keys() if not str(k).endswith("_s")]
        for k in sorted(keys, key=str):
            if k not in a or k not in b:
                return f"{where}.{k}"
            found = _first_difference(a[k], b[k], exact, f"{where}.{k}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where} (length {len(a)} vs {len(b)})"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, exact, f"{where}[{i}]"))),
                    None)
    if isinstance(a, float) and isinstance(b, float) and not exact:
        return None if math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7) else f"{where} ({a!r} vs {b!r})"
    return None if a == b else f"{where} ({a!r} vs {b!r})"[:200]


# --- 5. benchmark ---------------------------------------------------------------------------------------
def benchmark(device: str, quick: bool) -> Result:
    """minimoe.tools.bench.run's expert-LoRA routes: tokens/s per route and minimoe's ratio to each PEFT route."""
    from .bench import reference, run as bench

    # the real OLMoE layer shape only on a GPU (a CPU needs minutes per step there); otherwise bench's
    # defaults (batch 4 x 256, median of 5 steps after 2, bf16 on CUDA) or, --quick, 3 steps of 2 x 64
    args = ["--shape", "olmoe-layer" if device.startswith("cuda") and not quick else "tiny"]
    if quick:
        args += ["--batch", "2", "--seq", "64", "--steps", "2", "--warmup", "1", "--threads", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        log = io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            rc = bench.main([*args, "--device", device, "--routes", *BENCH_ROUTES.values(), "--json", str(out)])
        no_report = {"results": [], "failed": list(BENCH_ROUTES.values())}
        report = json.loads(out.read_text()) if out.is_file() else no_report
    speed = {r["route"]: r["step_tok_s"] for r in report["results"] if not r.get("oom")}
    oom = {r["route"] for r in report["results"] if r.get("oom")}  # a result of the benchmark, not a failure
    parts = []
    for label, route in BENCH_ROUTES.items():
        if route in speed:
            parts.append(f"{label} {speed[route]:,.0f} tok/s")
        elif route in oom:
            parts.append(f"{label} out of memory")
        elif route in report["failed"]:
            parts.append(f"{label} FAILED")
        else:
            parts.append(f"{label} skipped ({reference.unavailable()})")
    ours = speed.get(BENCH_ROUTES["minimoe"])
    for label in ("PEFT grouped_mm", "PEFT eager"):
        if ours and BENCH_ROUTES[label] in speed:
            parts.append(f"x{ours / speed[BENCH_ROUTES[label]]:.2f} vs {label}")
    shape = args[1]
    detail = f"{shape}: " + ", ".join(parts)
    if rc or report["failed"]:
        return Result("FAIL", detail + f" | {log.getvalue().strip()[-300:]}")
    if ours is None:
        return Result("FAIL", detail)
    return Result("PASS", detail + " (throughput is reported, not judged)")


# --- the list and the runner --------------------------------------------------------------------------
def checks() -> list[tuple[str, callable]]:
    """(name, check(device, quick) -> Result), in the order they run."""
    out = [(f"parity {f}", functools.partial(num.parity, f)) for f in FAMILIES]
    out += [(f"transformers {f}", functools.partial(num.transformers_parity, f)) for f in FAMILIES]
    out += [("expert paths fp32", functools.partial(num.expert_paths, torch.float32)),
            ("expert paths bf16", functools.partial(num.expert_paths, torch.bfloat16)),
            ("lora skip path", num.lora_skip_path),
            ("adapter gradients", num.adapter_gradients),
            ("grow/shrink state", num.grow_shrink_state),
            ("compiled blocks", check_compile.compiled_blocks),
            ("packed attention", check_compile.packed_attention),
            ("epng resume", epng_resume),
            ("benchmark", benchmark)]
    return out


def run_check(fn, device: str, quick: bool) -> tuple[Result, float]:
    """Run one check; an exception is a FAIL whose detail is its last line (the traceback goes to stderr)."""
    t0 = time.perf_counter()
    try:
        result = fn(device, quick)
    except Exception as e:  # noqa: BLE001 - a self-check reports every failure instead of stopping
        traceback.print_exc(file=sys.stderr)
        result = Result("FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:300])
    return result, time.perf_counter() - t0


def print_table(rows: list[tuple[str, Result, float]], out=None) -> None:
    out = out or sys.stdout
    width = max(len("check"), *(len(name) for name, _, _ in rows))
    print(f"{'check':<{width}}  result  {'time':>6}  detail", file=out)
    print(f"{'-' * width}  ------  {'-' * 6}  ------", file=out)
    for name, result, seconds in rows:
        detail = " / ".join(x.strip() for x in result.detail.splitlines() if x.strip())  # one line per check
        print(f"{name:<{width}}  {result.status:<6}  {seconds:5.1f}s  {detail}", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minimoe check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="small benchmark (the tiny shape, a few steps): under a minute on a CPU "
                        "(default: on for cpu, off for cuda)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only the checks whose name starts with one of these (e.g. parity benchmark)")
    args = p.parse_args(argv)
    device = args.device
    if not device.startswith(("cpu", "cuda")):
        p.error(f"--device {device}: use cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    quick = args.quick if args.quick is not None else device.startswith("cpu")
    selected = [(n, fn) for n, fn in checks() if not args.only or n.startswith(tuple(args.only))]
    if not selected:
        p.error(f"--only {' '.join(args.only)}: no check matches; checks: {', '.join(n for n, _ in checks())}")
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    print(f"minimoe self-check on {device} ({name}), torch {torch.__version__}, "
          f"{'quick' if quick else 'full'}", flush=True)
    rows, t0 = [], time.perf_counter()
    for check_name, fn in selected:
        result, seconds = run_check(fn, device, quick)
        rows.append((check_name, result, seconds))
        print(f"  {check_name}: {result.status} ({seconds:.1f}s)", file=sys.stderr, flush=True)
    print()
    print_table(rows)
    failed = [n for n, r, _ in rows if r.status == "FAIL"]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed or skipped in {time.perf_counter() - t0:.0f}s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
