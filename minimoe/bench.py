"""Benchmark: training-step throughput and peak memory, minimoe next to transformers, in one run.

    python -m minimoe.bench                      # OLMoE-shaped "medium" model, batch 4 x 256, CPU fp32
    python -m minimoe.bench --device cuda --shape olmoe-layer   # bf16 on CUDA

Every route runs in its own subprocess (so peak RSS is its own) on the same weights and the same
batch: the parent saves one random checkpoint in the Hub layout and each worker loads it.
One step = forward with loss, backward, AdamW step over what the route trains; "fwd+bwd" times the
part before the optimizer. Routes: full fine-tuning, LoRA on the experts' gate+up (minimoe, and
transformers + PEFT), minimoe with heterogeneous per-expert ranks next to uniform r_max, and a
LoRA-MoE (DMEP) step before and after pruning half its experts.
transformers and peft are needed only for their routes, whose code is ``tests/reference_routes.py``
(minimoe itself never imports them; ``pip install -e '.[test]'``); without them those routes are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .adapters.adamw import AdamW

# Shapes (names as in config.json): an OLMoE-shaped MoE and a Qwen3-shaped dense model of the same
# width. "medium" is the shape of ENVIRONMENT.md's reference measurements.
SHAPES = {
    # a smoke-test shape: every route in seconds (the tests run it)
    "tiny": {
        "moe": dict(model_type="olmoe", vocab_size=256, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=512, eos_token_id=0, pad_token_id=1),
        "dense": dict(model_type="qwen3", vocab_size=256, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                      max_position_embeddings=512, eos_token_id=0),
    },
    "medium": {
        "moe": dict(model_type="olmoe", vocab_size=2048, hidden_size=256, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=8, intermediate_size=128, num_experts=32,
                    num_experts_per_tok=4, max_position_embeddings=4096, eos_token_id=0, pad_token_id=1),
        "dense": dict(model_type="qwen3", vocab_size=2048, hidden_size=256, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32, intermediate_size=768,
                      max_position_embeddings=4096, eos_token_id=0),
    },
    # OLMoE's expert count and top-k at a quarter of its width: where PEFT's per-forward W + B·A shows
    "wide": {
        "moe": dict(model_type="olmoe", vocab_size=4096, hidden_size=512, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=8, intermediate_size=256, num_experts=64,
                    num_experts_per_tok=8, max_position_embeddings=4096, eos_token_id=0, pad_token_id=1),
        "dense": dict(model_type="qwen3", vocab_size=4096, hidden_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, intermediate_size=1536,
                      max_position_embeddings=4096, eos_token_id=0),
    },
    # the real OLMoE-1B-7B layer shape (2 layers): for a GPU
    "olmoe-layer": {
        "moe": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, num_hidden_layers=2,
                    num_attention_heads=16, num_key_value_heads=16, intermediate_size=1024, num_experts=64,
                    num_experts_per_tok=8, max_position_embeddings=4096, eos_token_id=0, pad_token_id=1),
        "dense": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                      max_position_embeddings=4096, eos_token_id=0),
    },
}

DMEP_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# route -> (library, experts implementation, setup, shape). Setups are built in _setup().
ROUTES = {
    "minimoe full": ("minimoe", "auto", "full", "moe"),
    "minimoe full (loop experts)": ("minimoe", "loop", "full", "moe"),
    "transformers full (eager experts)": ("transformers", "eager", "full", "moe"),
    "transformers full (grouped_mm experts)": ("transformers", "grouped_mm", "full", "moe"),
    "minimoe expert LoRA r=8 gate+up": ("minimoe", "auto", "expert-lora", "moe"),
    "transformers+PEFT LoRA r=8 gate+up (eager experts)": ("transformers", "eager", "peft-lora", "moe"),
    "transformers+PEFT LoRA r=8 gate+up (grouped_mm experts)": ("transformers", "grouped_mm", "peft-lora", "moe"),
    "minimoe expert LoRA uniform r=16": ("minimoe", "auto", "expert-lora-r16", "moe"),
    "minimoe expert LoRA heterogeneous r in {0,8,16}": ("minimoe", "auto", "expert-lora-hetero", "moe"),
    "minimoe expert LoRA r=16, 3/4 of experts pruned": ("minimoe", "auto", "expert-lora-r16-pruned", "moe"),
    "minimoe expert LoRA r=16, 3/4 pruned, no skip": ("minimoe", "auto", "expert-lora-r16-pruned-noskip", "moe"),
    "minimoe LoRA-MoE E=8 top-2 r=8 (dense)": ("minimoe", "auto", "lora-moe", "dense"),
    "minimoe LoRA-MoE after pruning to E=4 (dense)": ("minimoe", "auto", "lora-moe-pruned", "dense"),
}


def _save_checkpoint(shape: dict, directory: Path, seed: int) -> None:
    """A random checkpoint in the Hub layout, written by minimoe's own model (no transformers needed)."""
    from safetensors.torch import save_file

    from .model.config import ModelConfig
    from .model.hf import to_hub_state_dict
    from .lm import CausalLM

    config = ModelConfig.from_hf_config(shape)
    torch.manual_seed(seed)
    state = to_hub_state_dict(CausalLM(config).state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config.to_hf_config()))


def _setup(route: str, directory: Path, device: str, dtype: torch.dtype):
    """Load the checkpoint for ``route`` and attach what it trains; returns (model, trainable params)."""
    library, impl, setup, _ = ROUTES[route]
    if library == "minimoe":
        from .lm import from_pretrained

        model = from_pretrained(directory, dtype=dtype, device=device)
        model.set_experts_implementation(impl)
        g = torch.Generator().manual_seed(0)
        if setup.startswith("expert-lora"):
            rank = 16 if setup.startswith("expert-lora-r16") else 8
            model.add_expert_lora(rank=rank, alpha=2 * rank, generator=g)
            if setup.startswith("expert-lora-r16-pruned"):  # what EPnG leaves after many events
                E = model.config.num_experts
                model.prune_expert_lora({layer: [e for e in range(E) if e % 4] for layer in model.config.moe_layers})
                if setup.endswith("noskip"):  # the same layout with pruned experts packed as zero rows
                    for m in model.modules():
                        if hasattr(m, "skip_pruned_fraction"):
                            m.skip_pruned_fraction = 2.0
            if setup == "expert-lora-hetero":  # even experts grown to 16, every fourth pruned, rest at 8
                E = model.config.num_experts
                for layer in model.config.moe_layers:
                    model.grow_expert_lora({layer: {e: 8 for e in range(0, E, 2)}}, generator=g)
                    model.prune_expert_lora({layer: list(range(1, E, 4))})
        elif setup.startswith("lora-moe"):
            model.add_lora_moe(num_experts=8, top_k=2, rank=8, alpha=16, targets=DMEP_TARGETS, generator=g)
            if setup == "lora-moe-pruned":
                model.prune_lora_moe({name: [0, 2, 4, 6] for name in model.lora_moe_modules()})
        params = model.adapter_parameters() if setup != "full" else list(model.parameters())
        return model.train(), params
    return _reference_routes().setup(setup, impl, directory, device, dtype)


# transformers/PEFT routes: reference code kept with the tests (minimoe never imports those libraries)
REFERENCE_ROUTES = Path(__file__).resolve().parents[1] / "tests" / "reference_routes.py"


def _reference_routes():
    spec = importlib.util.spec_from_file_location("reference_routes", REFERENCE_ROUTES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    model, params = _setup(args.worker, Path(args.dir) / ROUTES[args.worker][3], device, dtype)
    # one multi-tensor AdamW for every route (minimoe's counts steps per expert-LoRA row: its grown rows train fresh)
    opt = (AdamW if ROUTES[args.worker][0] == "minimoe" else torch.optim.AdamW)(params, lr=1e-5, foreach=True)
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
        loss = out.loss
        if getattr(out, "adapter_aux_loss", None) is not None:  # LoRA-MoE trains with its LB loss
            loss = loss + 0.01 * out.adapter_aux_loss
        loss.backward()
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
        peak = peak_rss() / 2**20
    return dict(route=args.worker, fwd_bwd_tok_s=tokens / statistics.median(fwd_bwd),
                step_tok_s=tokens / statistics.median(step), peak_mib=peak,
                trainable=sum(p.numel() for p in params), loss=float(out.loss))


def peak_rss() -> int:
    """This process's peak resident set size, in bytes (Linux ``VmHWM``). Not ``getrusage``'s maxrss: that
    survives ``exec`` and starts at the parent's size, so a measuring process started by a large one (a test
    session holding models) would report the parent's peak."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def _have_reference() -> bool:
    """Whether the transformers routes can run: the libraries installed and the reference file present."""
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft")) and REFERENCE_ROUTES.is_file()


def main(argv=None) -> int:
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
        return 0

    routes = args.routes or list(ROUTES)
    unknown = [r for r in routes if r not in ROUTES]
    if unknown:
        p.error(f"unknown --routes {unknown}; choose from {list(ROUTES)}")
    if not _have_reference():
        print(f"transformers/peft not installed or {REFERENCE_ROUTES} absent: their routes are skipped "
              "(in a clone of the repository: pip install -e '.[test]')")
        routes = [r for r in routes if ROUTES[r][0] == "minimoe"]

    shapes = SHAPES[args.shape]
    results, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in sorted({ROUTES[r][3] for r in routes}):
            (Path(tmp) / kind).mkdir()
            _save_checkpoint(shapes[kind], Path(tmp) / kind, seed=0)
        for route in routes:
            cmd = [sys.executable, "-m", "minimoe.bench", "--worker", route, "--dir", tmp]
            for flag in ("shape", "device", "dtype", "batch", "seq", "steps", "warmup", "threads"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                print(f"{route}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                failed.append(route)
                continue
            results.append(json.loads(line[-1][len("RESULT "):]))
            print(f"  done: {route}", file=sys.stderr)

    print()
    for kind, shape in shapes.items():
        desc = ", ".join(f"{k}={v}" for k, v in shape.items() if k not in ("model_type", "eos_token_id", "pad_token_id"))
        print(f"{kind}: {shape['model_type']} [{desc}]")
    print(f"batch {args.batch} x {args.seq} tokens, {args.device} {args.dtype}, "
          f"{args.threads} threads, median of {args.steps} steps (torch {torch.__version__})\n")
    mem = "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"| route | trainable params | fwd+bwd tok/s | step tok/s (fwd+bwd+AdamW) | {mem} |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['route']} | {r['trainable'] / 1e6:.1f}M | {r['fwd_bwd_tok_s']:,.0f} | {r['step_tok_s']:,.0f} | "
              f"{r['peak_mib']:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(dict(shapes=shapes, args={k: str(v) for k, v in vars(args).items()},
                                             results=results, failed=failed), indent=2))
    if failed:
        print(f"\n{len(failed)} route(s) failed (see above): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
