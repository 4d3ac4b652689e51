"""What ``minimoe bench`` needs at real scale, and its EPnG event measurement.

* ``write_random_checkpoint`` — a random checkpoint of any benchmark shape in the Hub layout (safetensors
  shards + ``model.safetensors.index.json``), written tensor by tensor in the dtype asked for: the full
  OLMoE-1B-7B is 14 GB in bf16, so neither the whole model nor an fp32 copy of it may ever be in memory.
  The key names and shapes come from minimoe's own model built on the meta device (``to_hub_state_dict``:
  the same keys as ``bench._save_checkpoint``), and each shard is written by a small safetensors writer
  that streams one tensor at a time (``safetensors.torch.save_file`` would hold a whole shard, twice).
* ``run_worker`` / ``out_of_memory`` — a route's subprocess, its memory watched from outside (the parent
  reads the worker's ``/proc/PID/status`` every 0.2 s: a worker killed by the OOM killer cannot report its own
  peak), and whether its end was running out of memory: a result of the benchmark, not a failure.
* ``event_worker`` — the cost of one EPnG prune/grow event next to the training steps between two events.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...adapters.adamw import AdamW
from ...utils.memory import peak_memory_mb



# --- the streamed random checkpoint ------------------------------------------------------------------
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
MAX_SHARD_BYTES = 2 * 2**30  # shards of at most 2 GiB (one tensor larger than that gets a shard alone)


@dataclass
class TensorSpec:
    """One tensor of the checkpoint: its Hub key, shape and how it is filled (normal, ones or zeros)."""

    key: str
    shape: tuple[int, ...]
    fill: str

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * dtype.itemsize


def checkpoint_specs(shape: dict) -> list[TensorSpec]:
    """The Hub keys and shapes of a shape dict's checkpoint, from minimoe's model on the meta device (no
    memory). Filled as ``Transformer.init_weights`` does: RMSNorm weights ones (so the logits stay finite),
    biases zeros, every other tensor normal(0, 0.02). A tied head is not written (as ``write_hub_checkpoint``)."""
    from ...model.config import ModelConfig
    from ...model.hf import to_hub_state_dict
    from ...model.model import RMSNorm, Transformer

    config = ModelConfig.from_hf_config(shape)
    with torch.device("meta"):
        model = Transformer(config)
    norms = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, RMSNorm)}
    specs = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.tied:
            continue
        fill = "ones" if name in norms else "zeros" if name.endswith(".bias") else "normal"
        specs += [TensorSpec(key, tuple(v.shape), fill) for key, v in to_hub_state_dict({name: t}).items()]
    return specs


def plan_shards(specs: list[TensorSpec], dtype: torch.dtype, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes`` each."""
    shards, size = [[]], 0
    for s in specs:
        n = s.nbytes(dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def _write_safetensors(path: Path, specs: list[TensorSpec], dtype: torch.dtype, generator: torch.Generator,
                       std: float) -> None:
    """A safetensors file whose tensors are made and written one at a time. The format: an 8-byte little-endian
    header length, a JSON header (per tensor: dtype, shape, byte offsets into the data; padded with spaces to
    8 bytes, as the reference writer does), then the tensors' bytes back to back in header order."""
    header, offset = {}, 0
    for s in specs:
        n = s.nbytes(dtype)
        header[s.key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(s.shape),
                         "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}  # transformers refuses safetensors files without it
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            t = torch.empty(s.shape, dtype=dtype)
            if s.fill == "normal":
                t.normal_(0.0, std, generator=generator)
            else:
                t.fill_(1.0 if s.fill == "ones" else 0.0)
            f.write(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, not a copy of them
            del t


def write_random_checkpoint(shape: dict, directory: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            max_shard_bytes: int = MAX_SHARD_BYTES, std: float = 0.02) -> dict:
    """A random checkpoint of ``shape`` (a config.json dict) in ``directory``: config.json (its ``dtype`` set to
    ``dtype``), shards ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``. At most one
    tensor is in memory at a time. Refuses (OSError) before writing when the disk has no room for it.
    Returns ``{"bytes", "files", "tensors", "seconds"}``."""
    from ...model.config import ModelConfig

    if sys.byteorder != "little":  # the bytes are written as this machine holds them; safetensors is little-endian
        raise OSError("write_random_checkpoint writes the tensors' memory as is: a little-endian machine is needed")
    t0 = time.perf_counter()
    specs = checkpoint_specs(shape)
    total = sum(s.nbytes(dtype) for s in specs)
    free = shutil.disk_usage(directory).free
    if total + 2**26 > free:
        raise OSError(f"{directory}: the random checkpoint needs {total / 1e9:.1f} GB, only {free / 1e9:.1f} GB "
                      "are free (choose another place with --workdir)")
    shards = plan_shards(specs, dtype, max_shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(directory / name, shard, dtype, generator, std)
        weight_map.update({s.key: name for s in shard})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = ModelConfig.from_hf_config(shape).replace(dtype=str(dtype).removeprefix("torch."))
    (directory / "config.json").write_text(json.dumps(config.to_hf_config()))
    return dict(bytes=total, files=len(shards), tensors=len(specs), seconds=time.perf_counter() - t0)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on (Linux ``/proc/mounts``; "" where unknown): a tmpfs holds its
    files in memory, where a 14 GB checkpoint would take the routes' memory away."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    path = str(Path(path).resolve())
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else ""


# --- a worker, watched from outside -------------------------------------------------------------------
# what a worker's stderr says when an allocation failed (CPU: Python's or torch's allocator; CUDA)
OOM_MESSAGES = ("MemoryError", "DefaultCPUAllocator: can't allocate memory", "CUDA out of memory",
                "OutOfMemoryError")


def out_of_memory(returncode: int, stderr: str) -> str | None:
    """Why a worker that ended with ``returncode`` ran out of memory, or None if it did not. SIGKILL is what the
    Linux OOM killer sends (nobody else in a benchmark run does); otherwise an allocation error in stderr."""
    if returncode == -signal.SIGKILL:
        return "killed by SIGKILL (the kernel's OOM killer)"
    if returncode:
        for line in reversed(stderr.splitlines()):
            if any(m in line for m in OOM_MESSAGES):
                return line.strip()[:300]
    return None


@dataclass
class WorkerRun:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes: the largest VmHWM/VmRSS the parent saw (0 if the worker ended before the first look)
    stage: str  # the last "STAGE ..." line the worker printed: how far it got

    def result(self) -> dict | None:
        line = [x for x in self.stdout.splitlines() if x.startswith("RESULT ")]
        return json.loads(line[-1][len("RESULT "):]) if line and not self.returncode else None


def _rss(pid: int) -> int:
    """A live process's peak (VmHWM) or current (VmRSS) resident size in bytes, whichever is larger; 0 if
    unreadable (it ended, or not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            sizes = [int(x.split()[1]) * 1024 for x in f if x.startswith(("VmHWM:", "VmRSS:"))]
    except (OSError, ValueError, IndexError):
        return 0
    return max(sizes, default=0)


def run_worker(cmd: list[str], interval: float = 0.2) -> WorkerRun:
    """Run ``cmd`` to its end, reading its resident size every ``interval`` seconds."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    try:
        while True:
            peak = max(peak, _rss(proc.pid))
            try:
                out, err = proc.communicate(timeout=interval)
                break
            except subprocess.TimeoutExpired:
                continue
    except BaseException:  # Ctrl-C in the parent: no worker left behind
        proc.kill()
        proc.wait()
        raise
    stages = [x[len("STAGE "):] for x in out.splitlines() if x.startswith("STAGE ")]
    return WorkerRun(proc.returncode, out, err, peak, stages[-1] if stages else "")


def stage(text: str) -> None:
    """Tell the parent how far this worker got (the last one is named if it runs out of memory)."""
    print(f"STAGE {text}", flush=True)


# --- one EPnG prune/grow event, timed ---------------------------------------------------------------
EVENT_ROUTE = "minimoe EPnG prune/grow event"


def event_worker(args, directory: Path) -> dict:
    """Train expert LoRA as EPnG does (its own ``setup``: r=8 on gate+up; the forward's routes feed its
    importance statistics; AdamW as the trainer builds it, so the optimizer has state to carry), then time one
    event through the policy's own ``event`` (importance → prune the lowest α of the adapted experts globally →
    grow the top β with the freed parameters, the optimizer's state following), then the first step after it
    (the adapters re-pack their new layout) and the steps after that. A step is forward + backward + AdamW, as
    the benchmark's routes; the trainer's own step does more (clipping, checks), so the share is an upper bound."""
    from ...adapters.lm import from_pretrained
    from ...policies.base import Context
    from ...policies.epng import EPnG

    device, dtype = args.device, getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    stage("loading the checkpoint")
    model = from_pretrained(directory, dtype=dtype, device=device)
    model.set_experts_implementation("auto")
    policy = EPnG()
    policy.setup(model, Context(device=device))
    params = policy.trainable_parameters(model)
    opt = AdamW(params, lr=1e-5, fused=device.startswith("cuda") or None)  # the trainer's
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step() -> float:
        sync()
        t0 = time.perf_counter()
        out = model(ids, labels=ids, output_router=True)
        out.loss.backward()
        policy.stats.observe(out)  # every token is real: no mask
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    times = [step() for _ in range(args.warmup + args.steps)]
    before = times[args.warmup:] or times[-1:]
    stage(f"trained {args.warmup + args.steps} steps; the event")
    policy.stats.sync()  # (one process: nothing; the trainer calls it before every decision)
    sync()
    t0 = time.perf_counter()
    record = policy.event(args.warmup + args.steps, model, opt)
    sync()
    event_s = time.perf_counter() - t0
    stage("event done; steps after it")
    first = step()
    after = [step() for _ in range(args.steps)]
    step_s, after_s = statistics.median(before), statistics.median(after)
    interval = policy.config.interval
    return dict(route=EVENT_ROUTE, interval=interval, alpha=policy.config.alpha, beta=policy.config.beta,
                step_s=step_s, event_s=event_s, first_step_after_s=first, step_after_s=after_s,
                first_step_s=times[0],  # the run's very first step, for comparison with the first after the event
                step_times_s=times, step_times_after_s=[first, *after],
                event_pct=100 * event_s / (interval * step_s),
                # the first step's extra time over the steps after it is also the event's doing
                event_and_repack_pct=100 * (event_s + max(0.0, first - after_s)) / (interval * step_s),
                pruned=len(record["pruned"]), grown=len(record["grown"]),
                ranks_added=sum(d for _, _, d in record["grown"]), params_before=record["params_before"],
                params_after=record["params_after"], experts_with_adapter=record["experts_with_adapter"],
                experts=sum(len(r) for r in model.expert_lora_ranks().values()),
                peak_mib=peak_memory_mb(device))


def print_event(r: dict, shape_name: str) -> None:
    """The event measurement as a table."""
    ms = lambda s: f"{1e3 * s:,.1f} ms"  # noqa: E731
    print(f"EPnG event on {shape_name}: pruned {r['pruned']} of {r['experts']} expert adapters "
          f"(α={r['alpha']}), grew {r['grown']} experts (β={r['beta']}) by {r['ranks_added']} ranks; "
          f"adapter parameters {r['params_before']:,} -> {r['params_after']:,}\n")
    print("| | time |\n|---|---:|")
    print(f"| the run's first step (untimed warm-up) | {ms(r['first_step_s'])} |")
    print(f"| median step before the event (fwd+bwd+AdamW) | {ms(r['step_s'])} |")
    print(f"| the event (importance, prune, grow, optimizer state following) | {ms(r['event_s'])} |")
    print(f"| first step after the event (re-packing) | {ms(r['first_step_after_s'])} |")
    print(f"| median step after the event | {ms(r['step_after_s'])} |")
    print(f"| event / ({r['interval']} steps between events) | {r['event_pct']:.3f} % |")
    print(f"| (event + first step's extra) / ({r['interval']} steps) | {r['event_and_repack_pct']:.3f} % |")
