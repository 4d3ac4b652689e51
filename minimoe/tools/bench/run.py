"""Benchmark: training-step throughput and peak memory, minimoe next to transformers, in one run.

    minimoe bench                      # OLMoE-shaped "medium" model, batch 4 x 256, CPU fp32
    minimoe bench --device cuda --shape olmoe-layer   # bf16 on CUDA
    minimoe bench --shape olmoe-1b-7b  # the full OLMoE-1B-7B, bf16, batch 1 x 256: a 24 GB CPU machine
    minimoe bench --shape wide --event # what one EPnG prune/grow event costs next to 50 steps
    minimoe bench --data longtail      # one epoch of long-tailed data: padded, grouped, packed (lengths.py)

Every route runs in its own subprocess (so peak RSS is its own) on the same weights and the same
batch: the parent saves one random checkpoint in the Hub layout and each worker loads it.
One step = forward with loss, backward, AdamW step over what the route trains; "fwd+bwd" times the
part before the optimizer. Routes: full fine-tuning, LoRA on the experts' gate+up (minimoe, and
transformers + PEFT), minimoe with heterogeneous per-expert ranks next to uniform r_max, and a
LoRA-MoE (DMEP) step before and after pruning half its experts.
transformers and peft are needed only for their routes, whose code is ``benchmarks/reference_routes.py`` of a
clone of the repository (found by ``reference.py``), loaded only when such a route runs (the ``bench`` extra:
``pip install 'minimoe[bench]'``); without them, or from a wheel, those routes are skipped.

A route whose worker runs out of memory (killed by the OOM killer, or an allocation error) is a result: its row
says "out of memory" and how large the worker had grown; only other failures make the exit status non-zero.
The olmoe-1b-7b checkpoint (14 GB in bf16) is written shard by shard, one tensor at a time (``real.py``;
``--stream-checkpoint`` does the same for any shape), in ``--workdir`` (default: the system's temporary
directory; not a tmpfs, whose files take memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import real as bench_real, reference
from ...adapters.adamw import AdamW
from ...utils.memory import peak_memory_mb
from .real import EVENT_ROUTE, out_of_memory, run_worker, stage
from ...model.compiling import compile_layers
from ...model.reference import shipped_shapes
from ...policies.dmep import lb_loss


def _shipped_shape(name: str) -> dict:
    """The architecture keys of a reference checkpoint's config.json as shipped in ``model/shapes`` (exact,
    offline); what records how it was saved or run (dtype, cache, name) is left out."""
    d = json.loads(shipped_shapes()[name].read_text())
    return {k: v for k, v in d.items()
            if k not in ("_name_or_path", "architectures", "torch_dtype", "dtype", "use_cache", "output_router_logits")}


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
    # the whole allenai/OLMoE-1B-7B-0125 (16 layers, 6.9B parameters, 14 GB in bf16): MoE only
    "olmoe-1b-7b": {"moe": _shipped_shape("allenai/OLMoE-1B-7B-0125")},
}

# What a run uses when a flag is not given: the defaults, then its shape's. The full 7B model fits a 24 GB CPU
# machine only in bf16 at batch 1 and with adapters (full fine-tuning holds 4+ copies of 7B parameters), and its
# checkpoint can only be written streamed.
DEFAULTS = dict(batch=4, seq=256, steps=5, warmup=2, stream_checkpoint=False)
SHAPE_DEFAULTS = {
    "olmoe-1b-7b": dict(dtype="bfloat16", batch=1, steps=2, warmup=1, stream_checkpoint=True,
                        routes=["minimoe expert LoRA r=8 gate+up",
                                "transformers+PEFT LoRA r=8 gate+up (grouped_mm experts)"]),
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
COMPILED = ", torch.compile"  # --compile: a minimoe route again, each block compiled (compiling.py)


def _route(name: str) -> tuple:
    """``ROUTES``' entry of a route, compiled (``--compile``) or not."""
    return ROUTES[name.removesuffix(COMPILED)]


def _save_checkpoint(shape: dict, directory: Path, seed: int) -> None:
    """A random checkpoint in the Hub layout, written by minimoe's own model (no transformers needed)."""
    from safetensors.torch import save_file

    from ...model.config import ModelConfig
    from ...model.hf import to_hub_state_dict
    from ...adapters.lm import CausalLM

    config = ModelConfig.from_hf_config(shape)
    torch.manual_seed(seed)
    state = to_hub_state_dict(CausalLM(config).state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config.to_hf_config()))


def _setup(route: str, directory: Path, device: str, dtype: torch.dtype):
    """Load the checkpoint for ``route`` and attach what it trains; returns (model, trainable params)."""
    library, impl, setup, _ = _route(route)
    if library == "minimoe":
        from ...adapters.lm import from_pretrained

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
        if route.endswith(COMPILED):  # compiled in the first warm-up step
            compile_layers(model)
        return model.train(), params
    return reference.load().setup(setup, impl, directory, device, dtype)


def _worker(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    stage("loading the checkpoint")
    model, params = _setup(args.worker, Path(args.dir) / _route(args.worker)[3], device, dtype)
    # one multi-tensor AdamW for every route (minimoe's counts steps per expert-LoRA row: its grown rows train fresh)
    opt = (AdamW if _route(args.worker)[0] == "minimoe" else torch.optim.AdamW)(params, lr=1e-5, foreach=True)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    stage(f"loaded; {sum(p.numel() for p in params):,} trainable parameters")
    fwd_bwd, step = [], []
    for i in range(args.warmup + args.steps):
        stage(f"step {i + 1} of {args.warmup + args.steps}")
        sync()
        t0 = time.perf_counter()
        out = model(ids, labels=ids)
        loss = out.loss
        if getattr(out, "adapter_balancing", None):  # a LoRA-MoE trains with DMEP's LB term, as minimoe train adds it
            loss = loss + lb_loss(out)
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
    peak = peak_memory_mb(device)
    return dict(route=args.worker, fwd_bwd_tok_s=tokens / statistics.median(fwd_bwd),
                step_tok_s=tokens / statistics.median(step), peak_mib=peak,
                trainable=sum(p.numel() for p in params), loss=float(out.loss))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with each flag not given set from ``DEFAULTS`` and then its shape's ``SHAPE_DEFAULTS``;
    routes the shape cannot run are refused here, before anything is written."""
    p = argparse.ArgumentParser(prog="minimoe bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="medium", help="model shape (default: medium)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="parameter dtype (default: float32 on CPU, bfloat16 on CUDA; olmoe-1b-7b: bfloat16)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 4; olmoe-1b-7b: 1)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 256)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps; the median is reported (default: 5; olmoe-1b-7b: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2; olmoe-1b-7b: 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    p.add_argument("--routes", nargs="*", default=None,
                   help=f"subset of routes (default: all; olmoe-1b-7b: {SHAPE_DEFAULTS['olmoe-1b-7b']['routes']}): "
                        f"{list(ROUTES)}")
    p.add_argument("--event", action="store_true",
                   help="instead of the routes: time one EPnG prune/grow event against the steps between events")
    p.add_argument("--compile", action="store_true",
                   help="also run each minimoe route with torch.compile per decoder block (compiled in the warm-up "
                        "steps); with --data: each mode compiled too")
    p.add_argument("--stream-checkpoint", action="store_true", default=None,
                   help="write the random checkpoint in --dtype, shard by shard and tensor by tensor "
                        "(always for olmoe-1b-7b)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the random checkpoint is written (default: the system's temporary directory)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    lengths = p.add_argument_group("real lengths (lengths.py)", "instead of the routes: one epoch of a data file, "
                                   "padded, --group-by-length and --packing, next to transformers+PEFT padded")
    lengths.add_argument("--data", help="a data file (the formats of minimoe train), or 'longtail': a built-in "
                                        "long-tailed file")
    lengths.add_argument("--model", default="tiny-moe", help="with --data: the model (default: the shipped tiny-moe)")
    lengths.add_argument("--max-len", type=int, default=512, help="with --data: tokens per example (default: 512)")
    lengths.add_argument("--rows", type=int, default=2048, help="with --data longtail: its rows (default: 2048)")
    lengths.add_argument("--reference-experts", nargs="*", default=["eager"],
                         help="with --data: the transformers experts implementations to run (default: eager)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.data and (args.event or args.routes):
        p.error("--data measures one epoch of a file instead of the routes: give --data, or --routes/--event")
    if args.data and args.batch is None:
        args.batch = 16
    if args.event and args.routes:
        p.error("--event measures the EPnG event instead of the routes: give --event or --routes, not both")
    for key, value in {**DEFAULTS, **SHAPE_DEFAULTS.get(args.shape, {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.routes = args.routes or list(ROUTES)
    if not args.worker:
        unknown = [r for r in args.routes if r not in ROUTES]
        if unknown:
            p.error(f"unknown --routes {unknown}; choose from {list(ROUTES)}")
        absent = [r for r in args.routes if ROUTES[r][3] not in SHAPES[args.shape]]
        if absent:
            p.error(f"shape {args.shape} has no {ROUTES[absent[0]][3]} model (it is {', '.join(SHAPES[args.shape])} "
                    f"only): routes {absent} cannot run on it")
    return args


def _write_checkpoint(shape: dict, directory: Path, args) -> dict:
    """The random checkpoint every route of one kind loads: ``{"bytes", "files", "seconds", "streamed"}``."""
    directory.mkdir()
    print(f"  writing the random checkpoint in {directory} ...", file=sys.stderr)
    if args.stream_checkpoint:
        if bench_real.filesystem_type(directory) == "tmpfs":
            print(f"  warning: {directory} is on a tmpfs: the checkpoint will take memory from the routes "
                  "(choose a disk with --workdir)", file=sys.stderr)
        info = bench_real.write_random_checkpoint(shape, directory, seed=0, dtype=getattr(torch, args.dtype))
        info.update(dtype=args.dtype)
    else:
        t0 = time.perf_counter()
        _save_checkpoint(shape, directory, seed=0)
        files = list(directory.glob("*.safetensors"))
        info = dict(bytes=sum(f.stat().st_size for f in files), files=len(files), seconds=time.perf_counter() - t0,
                    dtype="float32")
    info.update(streamed=bool(args.stream_checkpoint))
    print(f"  {_checkpoint_line(info)}", file=sys.stderr)
    return info


def _checkpoint_line(info: dict) -> str:
    how = "streamed, tensor by tensor" if info["streamed"] else "in memory"
    size = f"{info['bytes'] / 1e9:.2f} GB" if info["bytes"] >= 1e8 else f"{info['bytes'] / 1e6:.2f} MB"
    return (f"checkpoint: {size} {info['dtype']} in {info['files']} file(s), "
            f"written in {info['seconds']:.1f} s ({how})")


def _oom_row(route: str, reason: str, run) -> dict:
    """The result of a route that ran out of memory: no numbers, how large its worker had grown and how far it got."""
    return dict(route=route, oom=True, reason=reason, stage=run.stage, peak_rss_mib_seen=run.peak_rss / 2**20,
                fwd_bwd_tok_s=None, step_tok_s=None, peak_mib=None, trainable=None, loss=None)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.worker == EVENT_ROUTE:
            result = bench_real.event_worker(args, Path(args.dir) / "moe")
        else:
            result = _worker(args)
        print("RESULT " + json.dumps(result))
        return 0

    if args.data:  # one epoch of a file of real lengths (lengths.py)
        from . import lengths

        return lengths.run(args)
    routes = [EVENT_ROUTE] if args.event else args.routes
    if not args.event and (why := reference.unavailable()):
        print(f"transformers routes skipped: {why}")
        routes = [r for r in routes if ROUTES[r][0] == "minimoe"]
    if args.compile and not args.event:  # each minimoe route, then the same compiled
        routes = [v for r in routes for v in ([r, r + COMPILED] if ROUTES[r][0] == "minimoe" else [r])]

    shapes = SHAPES[args.shape]
    results, failed, checkpoints = [], [], {}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="minimoe-bench-") as tmp:
        for kind in sorted({"moe" if r == EVENT_ROUTE else _route(r)[3] for r in routes}):
            checkpoints[kind] = _write_checkpoint(shapes[kind], Path(tmp) / kind, args)
        for route in routes:
            cmd = [sys.executable, "-m", "minimoe.tools.bench.run", "--worker", route, "--dir", tmp]
            for flag in ("shape", "device", "dtype", "batch", "seq", "steps", "warmup", "threads"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            run = run_worker(cmd)
            result = run.result()
            if result is not None:
                results.append({**result, "oom": False})
                print(f"  done: {route}", file=sys.stderr)
            elif reason := out_of_memory(run.returncode, run.stderr):
                results.append(_oom_row(route, reason, run))
                print(f"  out of memory: {route} ({reason}; at: {run.stage or 'start'}; resident size reached "
                      f"{run.peak_rss / 2**20:,.0f} MiB)", file=sys.stderr)
            else:
                print(f"{route}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
                failed.append(route)

    print()
    for kind, shape in shapes.items():
        if kind not in checkpoints:  # (no route ran on it)
            continue
        desc = ", ".join(f"{k}={v}" for k, v in shape.items() if k not in ("model_type", "eos_token_id", "pad_token_id"))
        print(f"{kind}: {shape['model_type']} [{desc}]")
        print(f"  {_checkpoint_line(checkpoints[kind])}")
    print(f"batch {args.batch} x {args.seq} tokens, {args.device} {args.dtype}, "
          f"{args.threads} threads, median of {args.steps} steps (torch {torch.__version__})\n")
    if args.event:
        for r in results:
            if not r["oom"]:
                bench_real.print_event(r, args.shape)
    else:
        _print_table(results, args.device)
    for r in results:
        if r["oom"]:
            print(f"\nout of memory: {r['route']}: {r['reason']}, at: {r['stage'] or 'start'}; its resident size "
                  f"had reached {r['peak_rss_mib_seen']:,.0f} MiB (as last read, every 0.2 s)")
    if args.json:
        args.json.write_text(json.dumps(dict(shapes=shapes, args={k: str(v) for k, v in vars(args).items()},
                                             checkpoints=checkpoints, results=results, failed=failed), indent=2))
    if failed:
        print(f"\n{len(failed)} route(s) failed (see above): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _print_table(results: list[dict], device: str) -> None:
    mem = "peak GPU MiB" if device.startswith("cuda") else "peak RSS MiB"
    print(f"| route | trainable params | fwd+bwd tok/s | step tok/s (fwd+bwd+AdamW) | {mem} |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        if r["oom"]:  # on CUDA the parent's reading (host RSS) is not the column's GPU memory
            seen = "–" if device.startswith("cuda") else f"≥ {r['peak_rss_mib_seen']:,.0f}"
            print(f"| {r['route']} | – | out of memory | out of memory | {seen} |")
            continue
        print(f"| {r['route']} | {r['trainable'] / 1e6:.1f}M | {r['fwd_bwd_tok_s']:,.0f} | {r['step_tok_s']:,.0f} | "
              f"{r['peak_mib']:,.0f} |")


if __name__ == "__main__":
    sys.exit(main())
