"""Training checkpoints: everything needed to continue a run bit for bit.

``RUN/checkpoint/`` holds
    model.safetensors   trainable parameters (whole: sharded ones gathered) and buffers
    optimizer.pt        optimizer state keyed by parameter name, param groups as name lists, scheduler state
    state.pt            policy state (generator, decisions), routing statistics, data position, RNG states
    trainer.json        human-readable: step, the run's arguments, processes, adapter layout (every adapter's
                        spec: chunk sizes, LoRA-MoE survivors, ESFT's selection)

Checkpoints written before the adapter protocol (counts, expert ids and ESFT's selection as buffers, EPnG's
statistics in its policy state, the old layout format) still load, and so do those written while expert LoRA
kept a tensor per expert and growth chunk (``...lora.{e}.A.{c}``; now one ``lora_A`` / ``lora_B`` per projection:
``flatten_chunks``).

A checkpoint is written into a temporary directory and renamed into place (``files.atomic_dir``), so
``checkpoint/`` is always complete (a crash leaves at worst a ``.checkpoint.tmp-*`` directory, never read). Resuming
rebuilds the adapter layout first, then loads weights and the optimizer state by name, checking
every shape.
"""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adapters.base import Adapter, adapters_of, replace_module
from ..utils.files import atomic_dir, previous_copy, save_torch
from ..parallel.fsdp import full, shard_like

CHECKPOINT = "checkpoint"


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model or optimizer it is loaded into."""


# --- adapter layout ---------------------------------------------------------------------------
def adapter_layout(model) -> dict:
    """Every adapter's ``spec()`` with its kind (the adapter files' spec: chunk sizes of expert LoRA,
    survivors of LoRA-MoE, ESFT's selection, ...)."""
    return {"adapters": {name: {"kind": m.kind, **m.spec()} for name, m in adapters_of(model).items()}}


def _legacy_layout(model, layout: dict) -> dict:
    """Layouts written before the adapter protocol: chunk sizes of expert LoRA and survivors of LoRA-MoE,
    completed by the specs of the adapters the policy has just attached."""
    modules = dict(model.named_modules())
    specs = {}
    for name, chunks in layout.get("expert_lora", {}).items():
        m = modules.get(name)
        base = m.spec() if isinstance(m, Adapter) else {}
        specs[name] = {**base, "kind": "expert_lora", "chunks": chunks, "ranks": [sum(c) for c in chunks]}
    for name, spec in layout.get("lora_moe", {}).items():
        m = modules.get(name)
        base = m.spec() if isinstance(m, Adapter) else {}
        specs[name] = {**base, "kind": "lora_moe", **spec}
    return {"adapters": specs}


def apply_layout(model, layout: dict) -> None:
    """Rebuild the adapters the policy attached to a saved layout (before loading the saved weights):
    each is replaced by ``from_spec`` of the same kind on the same base."""
    if "adapters" not in layout:
        layout = _legacy_layout(model, layout)
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)  # the values are overwritten by the checkpoint's
    for name, spec in layout["adapters"].items():
        m = modules.get(name)
        if not isinstance(m, Adapter) or m.kind != spec["kind"]:
            raise CheckpointMismatch(f"checkpoint layout names a {spec['kind']} adapter at {name}, which the model "
                                     f"does not have ({type(m).__name__ if m is not None else 'no module'})")
        spec, base = {k: v for k, v in spec.items() if k != "kind"}, m.base_module()
        problem = type(m).check_spec(base, spec)
        if problem:
            raise CheckpointMismatch(f"checkpoint layout: the {m.kind} adapter at {name} {problem}")
        replace_module(model, name, type(m).from_spec(base, spec, g))  # same base tensors, same requires_grad


# --- expert LoRA written as chunks ---------------------------------------------------------------
CHUNK_KEY = re.compile(r"^(?P<module>.+)\.lora\.(?P<expert>\d+)\.(?P<factor>[AB])\.(?P<chunk>\d+)$")


def _chunks_by_module(names) -> dict[str, list[tuple[int, int, str, str]]]:
    """``{module: [(expert, chunk, "A"|"B", name), ...]}`` sorted, for the chunk keys among ``names``."""
    found = {}
    for name in names:
        m = CHUNK_KEY.match(name)
        if m:
            found.setdefault(m["module"], []).append((int(m["expert"]), int(m["chunk"]), m["factor"], name))
    return {module: sorted(chunks) for module, chunks in found.items()}


def flatten_chunks(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Expert LoRA as written before its rows were flat: ``{module}.lora.{e}.A.{c} (r_c, in)`` and ``.B.{c}
    (out, r_c)`` become ``{module}.lora_A (Σr, in)`` / ``lora_B (out, Σr)``: experts in order, chunks in
    order (the row order of ``ResizableLoRAExpert``). Other keys pass through."""
    out = {k: v for k, v in tensors.items() if not CHUNK_KEY.match(k)}
    for module, chunks in _chunks_by_module(tensors).items():
        out[f"{module}.lora_A"] = torch.cat([tensors[n] for _, _, f, n in chunks if f == "A"], 0)
        out[f"{module}.lora_B"] = torch.cat([tensors[n] for _, _, f, n in chunks if f == "B"], 1)
    return out


def flatten_chunk_state(saved: dict, chunk_shapes: dict[str, tuple[int, ...]]) -> dict:
    """The optimizer state (``optimizer_state``'s form) of ``flatten_chunks``: moments concatenated like the
    weights, each chunk's step count repeated over its rows (minimoe's ``AdamW`` counts steps per row), zero
    moments and step 0 for a chunk never stepped; in the param groups each module's chunks become its two
    factors. ``chunk_shapes``: the chunks' shapes in the weights file (a chunk without state has no other)."""
    state = {k: v for k, v in saved["state"].items() if not CHUNK_KEY.match(k)}
    for module, chunks in _chunks_by_module(chunk_shapes).items():
        for factor, dim in (("A", 0), ("B", 1)):
            names = [n for _, _, f, n in chunks if f == factor]
            if not any(n in saved["state"] for n in names):
                continue
            moments, steps = {"exp_avg": [], "exp_avg_sq": []}, []
            for n in names:
                st, shape = saved["state"].get(n, {}), chunk_shapes[n]
                for k in moments:
                    moments[k].append(st[k] if k in st else torch.zeros(shape))
                steps.append(torch.full((shape[dim],), float(st.get("step", 0.0)), dtype=torch.float32))
            state[f"{module}.lora_{factor}"] = {"step": torch.cat(steps),
                                               **{k: torch.cat(v, dim) for k, v in moments.items()}}
    groups = []
    for g in saved["groups"]:
        names, done = [], set()
        for n in g["params"]:
            m = CHUNK_KEY.match(n)
            if not m:
                names.append(n)
            elif m["module"] not in done:
                done.add(m["module"])
                names += [f"{m['module']}.lora_A", f"{m['module']}.lora_B"]
        groups.append({**g, "params": names})
    return {"groups": groups, "state": state}


# --- optimizer state by name ------------------------------------------------------------------
def optimizer_state(model, optimizer, keep: bool = True) -> dict:
    """Param groups as name lists, state by parameter name, whole on the CPU (sharded moments gathered one
    at a time; ``keep=False``: take part in the gathering, keep nothing)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    state = {names[id(p)]: gathered(s, keep) for p, s in optimizer.state.items()}
    return {"groups": groups, "state": state}


def load_optimizer_state(model, optimizer, saved: dict) -> None:
    params = dict(model.named_parameters())
    if len(saved["groups"]) != len(optimizer.param_groups):
        raise CheckpointMismatch(f"optimizer has {len(optimizer.param_groups)} param groups, "
                                 f"checkpoint {len(saved['groups'])}")
    for group, sg in zip(optimizer.param_groups, saved["groups"]):
        unknown = [n for n in sg["params"] if n not in params]
        if unknown:
            raise CheckpointMismatch(f"checkpoint optimizer names parameters the model lacks: {unknown[:5]}")
        group.update({k: v for k, v in sg.items() if k != "params"})
        group["params"] = [params[n] for n in sg["params"]]
    optimizer.state.clear()
    for name, st in saved["state"].items():
        p = params[name]
        rows = (p.shape[p.row_dim],) if getattr(p, "row_dim", None) is not None else None
        for k, v in st.items():
            per_row = k == "step" and torch.is_tensor(v) and v.shape == rows  # minimoe's AdamW: a count per row
            if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape and not per_row:
                raise CheckpointMismatch(f"optimizer state {name}.{k} has shape {tuple(v.shape)}, "
                                         f"the parameter {tuple(p.shape)}")
        # per-row step counts stay on the CPU, where AdamW reads them; moments go where the parameter is
        optimizer.state[p] = {k: (v.clone() if k == "step" and torch.is_tensor(v) and v.shape == rows else
                                  shard_like(v, p) if torch.is_tensor(v) and v.dim() > 0 else
                                  v.to(p.device) if torch.is_tensor(v) else v) for k, v in st.items()}


# --- RNG ----------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every generator's state in plain containers and tensors (what ``weights_only`` loading accepts)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # (checkpoints before 2026-12 stored numpy's own tuple)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs (old checkpoints stored numpy's RNG state as one): array
    reconstruction only, which runs no code of the file's choosing."""
    core = getattr(np, "_core", None) or np.core
    names = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    names += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object())) if n.endswith("DType")]
    return names


def load_pickle(path: Path, mmap: bool = False):
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never code. A file asking to
    run anything else (a crafted ``state.pt``: ``__reduce__`` → ``os.system``) is refused, naming it."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the global it would have had to import
        what = f"GLOBAL {found.group(1)}" if found else str(e).strip().splitlines()[-1][:120]
        raise CheckpointMismatch(f"{path} is not a checkpoint minimoe wrote: it asks to run code or build "
                                 f"objects a checkpoint never holds ({what}); refusing to load it") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointMismatch(f"cannot read {path}: {type(e).__name__}: {str(e)[:200]}") from None


# --- save / load --------------------------------------------------------------------------------
def trainable_state(model, keep: bool = True) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers, whole, on the CPU. Sharded ones are gathered one at a time: every
    process calls this; one that does not write (``keep=False``) takes part and keeps nothing."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach() for n, b in model.named_buffers()})
    return gathered(state, keep)


def gathered(tensors: dict, keep: bool = True) -> dict:
    """``tensors`` whole, on the CPU, one at a time (collective for sharded ones: every process calls it)."""
    out = {}
    for k, v in tensors.items():
        whole = full(v) if torch.is_tensor(v) else v
        if keep:
            out[k] = whole.contiguous().cpu() if torch.is_tensor(whole) else whole
    return out


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, info: dict, state: dict,
                    weights: dict | None = None, optimizer_saved: dict | None = None) -> Path:
    """Write ``run_dir/checkpoint`` atomically. ``info`` goes to trainer.json; ``state`` to state.pt;
    ``weights`` / ``optimizer_saved``: ``trainable_state`` / ``optimizer_state``, when gathered already."""
    final = run_dir / CHECKPOINT
    weights = trainable_state(model) if weights is None else weights
    optimizer_saved = optimizer_state(model, optimizer) if optimizer_saved is None else optimizer_saved
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(weights, str(tmp / "model.safetensors"))
        # through a Python file: a full disk raises its OSError, not torch's "unexpected pos" (files.save_torch)
        save_torch({"optimizer": optimizer_saved, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        save_torch({**state, "rng": rng_state()}, tmp / "state.pt")
        (tmp / "trainer.json").write_text(json.dumps({**info, "layout": adapter_layout(model)}, indent=1))
    return final


def locate(run_dir: str | Path) -> Path:
    """``run_dir/checkpoint``; if a crash mid-replacement left only the previous copy, that copy."""
    final = Path(run_dir) / CHECKPOINT
    old = previous_copy(final)
    return old if not final.exists() and (old / "trainer.json").is_file() else final


def read_info(ckpt: Path) -> dict:
    file = ckpt / "trainer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{ckpt} is not a minimoe training checkpoint (no trainer.json)")
    return json.loads(file.read_text())


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, state: dict | None = None) -> dict:
    """Load weights, optimizer and scheduler (layout must already be applied) and set the saved RNG state;
    returns state.pt (``state``: the one already read from it, so it is read once)."""
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        # written before the adapter protocol: LoRA-MoE hard counts were a buffer ``{module}.counts`` (now the
        # routing statistics'), survivors and ESFT's selection buffers ``.expert_ids`` / ``.selected`` (layout)
        legacy = [k for k in shapes if k not in targets and k.rsplit(".", 1)[-1] in ("counts", "expert_ids", "selected")]
        legacy_counts = {k[:-len(".counts")]: f.get_tensor(k) for k in legacy if k.endswith(".counts")}
        shapes = {k: s for k, s in shapes.items() if k not in legacy}
        chunk_shapes = {k: s for k, s in shapes.items() if CHUNK_KEY.match(k)}  # expert LoRA before flat rows
        flat = flatten_chunks({k: f.get_tensor(k) for k in chunk_shapes})
        shapes = {**{k: s for k, s in shapes.items() if k not in chunk_shapes},
                  **{k: tuple(v.shape) for k, v in flat.items()}}
        problems = [f"{k}: checkpoint {s}, model {tuple(targets[k].shape)}"
                    for k, s in shapes.items() if k in targets and tuple(targets[k].shape) != s]
        unknown = [k for k in shapes if k not in targets]
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.numel() and n not in shapes]
        if problems or unknown or missing:
            raise CheckpointMismatch(f"{ckpt}/model.safetensors does not fit the model: "
                                     f"shapes {problems[:5]}, unknown {unknown[:5]}, missing {missing[:5]}")
        with torch.no_grad():
            for k in shapes:  # one tensor at a time (cut into this process's shard when sharded)
                targets[k].copy_(shard_like(flat[k] if k in flat else f.get_tensor(k), targets[k]))
    # memory-mapped: processes on one machine share the pages, none holds the whole state twice
    opt = load_pickle(ckpt / "optimizer.pt", mmap=True)
    saved = opt["optimizer"]
    load_optimizer_state(model, optimizer, flatten_chunk_state(saved, chunk_shapes) if chunk_shapes else saved)
    scheduler.load_state_dict(opt["scheduler"])
    state = load_pickle(ckpt / "state.pt") if state is None else state
    set_rng_state(state["rng"])
    if legacy_counts:
        state["legacy_counts"] = legacy_counts
    return state


def routing_stats_state(state: dict) -> dict:
    """The run's ``RoutingStats`` state from a loaded state.pt. Checkpoints written before the statistics
    were one object kept them in two places: EPnG's in its policy state, LoRA-MoE counts in the modules."""
    if "stats" in state:
        return state["stats"]
    if "stats" in state.get("policy", {}):
        return state["policy"]["stats"]
    counts = state.get("legacy_counts", {})
    return {"importance": {k: torch.zeros_like(v) for k, v in counts.items()}, "counts": counts,
            "gate": {k: torch.zeros_like(v) for k, v in counts.items()},
            "tokens": {k: 0.0 for k in counts}, "int_keys": [False] * len(counts)}
