"""Benchmark: training-step throughput and peak memory, minimoe next to transformers, in one run.

    python -m minimoe.bench                      # OLMoE-shaped "medium" model, batch 4 x 256, CPU fp32
    python -m minimoe.bench --device cuda --dtype bfloat16 --shape large

Every route runs in its own subprocess (so peak RSS is its own) on the same weights and the same
batch: the parent saves one random checkpoint in the Hub layout and each worker loads it.
One step = forward with loss, backward, AdamW step; "fwd+bwd" times the part before the optimizer.
transformers is needed only for its routes (``pip install minimoe[test]``); without it they are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# OLMoE-shaped configs (names as in config.json). "medium" is the shape of ENVIRONMENT.md's reference.
SHAPES = {
    "medium": dict(model_type="olmoe", vocab_size=2048, hidden_size=256, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=8, intermediate_size=128, num_experts=32,
                   num_experts_per_tok=4, max_position_embeddings=4096),
    "large": dict(model_type="olmoe", vocab_size=50304, hidden_size=1024, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=16, intermediate_size=512, num_experts=64,
                  num_experts_per_tok=8, max_position_embeddings=4096),
}

# route -> (library, experts implementation, what is trained)
ROUTES = {
    "minimoe full": ("minimoe", "auto", "full"),
    "minimoe full (loop experts)": ("minimoe", "loop", "full"),
    "transformers full (eager experts)": ("transformers", "eager", "full"),
    "transformers full (grouped_mm experts)": ("transformers", "grouped_mm", "full"),
}


def _save_checkpoint(shape: dict, directory: Path, seed: int) -> None:
    """A random checkpoint in the Hub layout, written by minimoe's own model (no transformers needed)."""
    from safetensors.torch import save_file

    from .config import ModelConfig
    from .hf import to_hub_state_dict
    from .model import CausalLM

    config = ModelConfig.from_hf_config(shape)
    torch.manual_seed(seed)
    state = to_hub_state_dict(CausalLM(config).state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config.to_hf_config()))


def _load(route: str, directory: Path, device: str, dtype: torch.dtype):
    library, impl, _ = ROUTES[route]
    if library == "minimoe":
        from .hf import from_pretrained

        model = from_pretrained(directory, dtype=dtype, device=device)
        model.set_experts_implementation(impl)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
        model.set_experts_implementation(impl)
    return model.train()


def _worker(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    model = _load(args.worker, Path(args.dir), device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fwd_bwd, step = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        out = model(ids, labels=ids)
        out.loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if i >= args.warmup:
            fwd_bwd.append(t1 - t0)
            step.append(t2 - t0)
    tokens = args.batch * args.seq
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(route=args.worker, fwd_bwd_tok_s=tokens / statistics.median(fwd_bwd),
                step_tok_s=tokens / statistics.median(step), peak_mib=peak,
                trainable=sum(p.numel() for p in params), loss=float(out.loss))


def _have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m minimoe.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="medium", help="model shape (default: medium)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="parameter dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    p.add_argument("--routes", nargs="*", default=None, help=f"subset of routes (default: all): {list(ROUTES)}")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.worker:
        print("RESULT " + json.dumps(_worker(args)))
        return

    routes = args.routes or list(ROUTES)
    unknown = [r for r in routes if r not in ROUTES]
    if unknown:
        p.error(f"unknown --routes {unknown}; choose from {list(ROUTES)}")
    if not _have_transformers():
        print("transformers is not installed: its routes are skipped (pip install 'minimoe[test]')")
        routes = [r for r in routes if ROUTES[r][0] == "minimoe"]

    shape = SHAPES[args.shape]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        _save_checkpoint(shape, Path(tmp), seed=0)
        for route in routes:
            cmd = [sys.executable, "-m", "minimoe.bench", "--worker", route, "--dir", tmp]
            for flag in ("shape", "device", "dtype", "batch", "seq", "steps", "warmup", "threads"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                print(f"{route}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(line[-1][len("RESULT "):]))
            print(f"  done: {route}", file=sys.stderr)

    desc = ", ".join(f"{k}={v}" for k, v in shape.items() if k != "model_type")
    print(f"\n{shape['model_type']} [{desc}]\nbatch {args.batch} x {args.seq} tokens, {args.device} {args.dtype}, "
          f"{args.threads} threads, median of {args.steps} steps (torch {torch.__version__})\n")
    mem = "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"| route | trainable params | fwd+bwd tok/s | step tok/s (fwd+bwd+AdamW) | {mem} |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['route']} | {r['trainable'] / 1e6:.1f}M | {r['fwd_bwd_tok_s']:,.0f} | {r['step_tok_s']:,.0f} | "
              f"{r['peak_mib']:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(dict(shape=shape, args={k: str(v) for k, v in vars(args).items()},
                                             results=results), indent=2))


if __name__ == "__main__":
    main()
