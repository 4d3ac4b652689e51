"""Check the memory plan against a real training step on this machine's CPU.

    minimoe plan-check --model bench:medium --policy lora         # one line: measured vs planned
    minimoe plan-check --model bench:wide --policy full --gradient-checkpointing

Each check runs in its own process: the model is built with random weights (no checkpoint, so no
memory-mapped file pages count), the policy attaches its adapters, and ``--steps`` optimizer steps run
(forward with loss, backward, AdamW as ``minimoe train`` builds it). Measured: the peak resident set size
(``VmHWM``) minus the resident size just before the model was built (the Python, torch and
minimoe runtime, which the plan does not count), after a warm-up step of a very small model (the
runtime's one-time allocations: kernel libraries, thread pools). Planned: ``minimoe.tools.plan`` for the run on
``cpu``.

Why ``MALLOC_MMAP_THRESHOLD_=65536`` in the measuring process: glibc raises its mmap threshold each time a
large mapped block is freed, after which blocks of that size come from the heap and freed ones stay there,
so the resident size keeps memory no tensor holds any more (measured here: +40% on ``bench:medium`` LoRA,
+26% on ``bench:wide``). With the threshold fixed every tensor above 64 KiB is its own mapping and
returned when freed, so the peak resident size is that of live tensors, which is what the plan counts.
``--default-malloc`` measures without it: what a default CPU process reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from ..utils.memory import peak_rss


def _rss() -> int:
    """This process's resident set size now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _warm_up(torch) -> None:
    """One training step of a very small model of the same code paths, then everything freed."""
    from ..adapters.adamw import AdamW
    from ..adapters.lm import CausalLM
    from ..model.config import preset

    model = CausalLM(preset("tiny-olmoe", num_hidden_layers=1))
    model.add_expert_lora(4, 8)
    opt = AdamW(model.adapter_parameters(), lr=1e-5)
    ids = torch.randint(0, 256, (1, 16))
    model.train()(ids, labels=ids).loss.backward()
    opt.step()
    del model, opt, ids
    import gc

    gc.collect()


def _worker(args) -> dict:
    import torch

    from ..adapters.adamw import AdamW
    from ..adapters.lm import CausalLM
    from .plan import _esft_selection, load_config
    from ..policies import Context, make_policy

    torch.set_num_threads(args.threads)
    config, _ = load_config(args.model)
    _warm_up(torch)  # the runtime's one-time allocations (kernel libraries, thread pools) are not the plan's
    baseline = _rss()
    torch.manual_seed(0)
    model = CausalLM(config).to(getattr(torch, args.dtype))
    policy = make_policy(args.policy, json.loads(args.options))
    if args.policy == "esft":
        policy.selection = _esft_selection(config, policy, args.esft_experts)
    policy.setup(model, Context(dataset=None))
    model.gradient_checkpointing = args.gradient_checkpointing
    params = policy.trainable_parameters(model)
    opt = AdamW(params, lr=1e-5)  # as minimoe train on CPU
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.max_len))
    model.train()
    for _ in range(args.steps):
        out = model(ids, labels=ids)
        extra = policy.extra_loss(out, None)  # e.g. DMEP's LB term: the loss minimoe train trains on
        loss = out.loss if extra is None else out.loss + extra
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out, loss
    peak = peak_rss()  # VmHWM, not getrusage (see minimoe.utils.memory)
    return {"measured": peak - baseline, "baseline": baseline}


def check(model: str, policy: str, options: dict | None = None, batch_size: int = 4, max_len: int = 256,
          dtype: str = "float32", gradient_checkpointing: bool = False, steps: int = 3, threads: int = 2,
          esft_experts: int | None = None, default_malloc: bool = False) -> dict:
    """Measured and planned bytes of one CPU run (the measurement in a subprocess of its own)."""
    from .plan import plan

    planned = plan(model, policy, options, batch_size, max_len, dtype, "cpu", gradient_checkpointing,
                   esft_experts=esft_experts)
    cmd = [sys.executable, "-m", "minimoe.tools.plan_check", "--worker", "--model", model, "--policy", policy,
           "--options", json.dumps(options or {}), "--batch-size", str(batch_size), "--max-len", str(max_len),
           "--dtype", dtype, "--steps", str(steps), "--threads", str(threads)]
    if gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if esft_experts:
        cmd += ["--esft-experts", str(esft_experts)]
    env = dict(os.environ)
    if not default_malloc:  # every large tensor its own mapping, unmapped when freed: RSS follows live tensors
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"the measuring process failed:\n{done.stderr[-2000:]}")
    measured = json.loads(lines[-1][len("RESULT "):])
    return {"model": model, "policy": policy, "batch": batch_size, "length": max_len, "dtype": dtype,
            "checkpointing": gradient_checkpointing, "planned": planned.total, "activations": planned.activations,
            "trainable": planned.trainable, **measured, "ratio": planned.total / measured["measured"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minimoe plan-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench:medium", help="as minimoe.tools.plan's --model (default: bench:medium)")
    p.add_argument("--policy", default="lora", help="lora, epng, dmep, esft or full (default: lora)")
    p.add_argument("--options", default="{}", help="policy options as JSON, e.g. '{\"rank\": 16}'")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--esft-experts", type=int, default=None)
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's adaptive mmap threshold (freed memory then stays in the heap: RSS is higher "
                        "than the live tensors; see the docstring)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(args)))
        return 0
    r = check(args.model, args.policy, json.loads(args.options), args.batch_size, args.max_len, args.dtype,
              args.gradient_checkpointing, args.steps, args.threads, args.esft_experts, args.default_malloc)
    mib = 2**20
    print(f"{r['model']} {r['policy']} batch {r['batch']} x {r['length']} {r['dtype']}"
          f"{' checkpointing' if r['checkpointing'] else ''}: measured {r['measured'] / mib:,.1f} MiB, planned "
          f"{r['planned'] / mib:,.1f} MiB ({r['ratio']:.2f}x; activations {r['activations'] / mib:,.1f} MiB, "
          f"runtime baseline {r['baseline'] / mib:,.0f} MiB not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
