"""Adapter files: ``save_adapter(model, dir)`` and ``model.load_adapter(dir)``.

``dir/adapter_config.json`` says what the adapter is; ``dir/adapter.safetensors`` holds its tensors:

    expert LoRA   {module}.lora_A.{e} [r_e, in], {module}.lora_B.{e} [out, r_e]   (experts with r_e > 0)
    LoRA          {module}.lora_A [r, in], {module}.lora_B [out, r]
    LoRA-MoE      {module}.lora_A [E', r, in], .lora_B [E', out, r], .router.weight [E', in]
    ESFT          {module}.trained [n_selected, out, in]

The config records per module the kind, rank(s), alpha and scaling, the per-expert ranks (EPnG), the
surviving LoRA-MoE experts with their original indices (DMEP), ESFT's selected experts, the base model
id and a fingerprint of the base weights and config; loading onto another base, or a file whose shapes
disagree with the config, is an error that says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import _replace
from .files import atomic_dir
from .lora import LoRALinear, ResizableLoRAExpert
from .lora_moe import PrunableLoRAMoE
from .moe import StackedLinear

FORMAT = "minimoe-adapter"
CONFIG, WEIGHTS = "adapter_config.json", "adapter.safetensors"
_ADAPTER_KEY = re.compile(r"(\.lora(\.|_A|_B)|\.router\.weight$|\.trained$|\.counts$|\.expert_ids$|\.selected$)")


class AdapterError(ValueError):
    """An adapter that does not fit the model, or a damaged adapter directory."""


KINDS = ("expert_lora", "lora", "lora_moe", "esft")
_FIELDS = {"expert_lora": ("rank", "alpha", "ranks"), "lora": ("rank", "alpha"),
           "lora_moe": ("expert_ids", "top_k", "rank", "alpha", "renormalize", "lb_enabled"), "esft": ("selected",)}


def _selected_experts_cls():
    from .policies.esft import SelectedExperts  # ESFT lives with its policy

    return SelectedExperts


FINGERPRINT_VERSION = 2


def fingerprint(model, version: int = FINGERPRINT_VERSION) -> str:
    """A short hash of the base model.

    Version 2: its config (less the dtype) and, per base tensor, name, shape, sum and 64 evenly strided
    values, all taken after rounding to bfloat16, so fp32 and bf16 loads of one checkpoint agree while a
    different checkpoint (or permuted rows) does not. (A float16 load rounds differently and does not
    agree.) Version 1 (adapters saved before ``fingerprint_version`` was recorded): the full config and,
    per tensor, name, shape, fp64 sum and first 8 values."""
    if version == 1:
        h = hashlib.sha256(json.dumps(model.config.to_hf_config(), sort_keys=True).encode())
        for name, t in model.state_dict().items():
            if not _ADAPTER_KEY.search(name):
                t = t.detach()
                head = t.flatten()[:8].double().cpu().tolist()
                h.update(f"{name}|{tuple(t.shape)}|{t.double().sum().item():.6e}|{head}".encode())
        return h.hexdigest()[:16]
    hf = {k: v for k, v in model.config.to_hf_config().items() if k not in ("dtype", "torch_dtype")}
    h = hashlib.sha256(json.dumps(hf, sort_keys=True).encode())
    for name, t in model.state_dict().items():
        if _ADAPTER_KEY.search(name):
            continue
        r = t.detach().to(torch.bfloat16)
        flat = r.flatten()
        sample = flat[:: max(1, flat.numel() // 64)][:64].double().cpu().tolist()
        total = torch.sum(r, dtype=torch.float64).item()
        h.update(f"{name}|{tuple(t.shape)}|{total:.6e}|{sample}".encode())
    return h.hexdigest()[:16]


def adapter_config(model) -> dict:
    """What ``save_adapter`` records, per module, plus the base model's identity."""
    cfg = {"format": FORMAT, "version": 1, "base_model": model.config.name_or_path,
           "base_fingerprint": fingerprint(model), "fingerprint_version": FINGERPRINT_VERSION,
           "base_dtype": str(model.dtype).replace("torch.", ""), "base_model_type": model.config.model_type,
           "expert_lora": {}, "lora": {}, "lora_moe": {}, "esft": {}}
    selected_cls = _selected_experts_cls()
    for name, m in model.named_modules():
        if isinstance(m, ResizableLoRAExpert):
            cfg["expert_lora"][name] = {"rank": m.rank, "alpha": m.alpha, "scaling": m.scaling,
                                        "ranks": m.ranks.tolist()}
        elif isinstance(m, LoRALinear):
            cfg["lora"][name] = {"rank": m.rank, "alpha": m.alpha, "scaling": m.scaling}
        elif isinstance(m, PrunableLoRAMoE):
            cfg["lora_moe"][name] = {"expert_ids": m.expert_ids.tolist(), "top_k": m.top_k, "rank": m.rank,
                                     "alpha": m.alpha, "scaling": m.scaling, "renormalize": m.renormalize,
                                     "lb_enabled": m.lb_enabled}
        elif isinstance(m, selected_cls):
            cfg["esft"][name] = {"selected": m.selected.tolist()}
    cfg["kinds"] = [k for k in ("expert_lora", "lora", "lora_moe", "esft") if cfg[k]]
    return cfg


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    out = {}
    selected_cls = _selected_experts_cls()
    for name, m in model.named_modules():
        if isinstance(m, ResizableLoRAExpert):
            for e in range(m.num_experts):
                if m.rank_of(e):
                    out[f"{name}.lora_A.{e}"] = m.lora_A_of(e)
                    out[f"{name}.lora_B.{e}"] = m.lora_B_of(e)
        elif isinstance(m, (LoRALinear, PrunableLoRAMoE)):
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A, m.lora_B
            if isinstance(m, PrunableLoRAMoE):
                out[f"{name}.router.weight"] = m.router.weight
        elif isinstance(m, selected_cls):
            out[f"{name}.trained"] = m.trained
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_adapter(model, directory, overwrite: bool = False) -> Path:
    """Write the model's adapters (and their layout) to ``directory``, atomically."""
    cfg = adapter_config(model)
    if not cfg["kinds"]:
        raise AdapterError("the model has no adapters to save (full fine-tuning: use minimoe.export_merged)")
    base = Path(cfg["base_model"]) if cfg["base_model"] else None
    if base is not None and base.is_dir():
        # also where the base lies from the adapter: a moved or re-cloned project (runs/x/adapter next to
        # weights/tiny-moe) still finds it
        cfg["base_model_relative"] = os.path.relpath(base.resolve(), Path(directory).resolve())
    with atomic_dir(directory, overwrite) as tmp:
        save_file(adapter_tensors(model), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=1))
    return Path(directory)


def _expected_shapes(model, cfg: dict) -> dict[str, tuple]:
    shapes = {}
    modules = dict(model.named_modules())
    for name, spec in cfg["expert_lora"].items():
        m = modules[name]
        for e, r in enumerate(spec["ranks"]):
            if r:
                shapes[f"{name}.lora_A.{e}"] = (r, m.in_features)
                shapes[f"{name}.lora_B.{e}"] = (m.out_features, r)
    for name, spec in cfg["lora"].items():
        m = modules[name]
        shapes[f"{name}.lora_A"], shapes[f"{name}.lora_B"] = (spec["rank"], m.in_features), (m.out_features, spec["rank"])
    for name, spec in cfg["lora_moe"].items():
        m, E, r = modules[name], len(spec["expert_ids"]), spec["rank"]
        shapes.update({f"{name}.lora_A": (E, r, m.in_features), f"{name}.lora_B": (E, m.out_features, r),
                       f"{name}.router.weight": (E, m.in_features)})
    for name, spec in cfg["esft"].items():
        m = modules[name]
        shapes[f"{name}.trained"] = (len(spec["selected"]), m.out_features, m.in_features)
    return shapes


def read_adapter(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise AdapterError(f"{directory} is not a minimoe adapter (no {CONFIG})")
    try:
        cfg = json.loads((directory / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{directory / CONFIG} is not valid JSON: {e}") from None
    if cfg.get("format") != FORMAT:
        raise AdapterError(f"{directory / CONFIG}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    for kind in KINDS:
        cfg[kind] = cfg.get(kind) or {}
        for name, spec in cfg[kind].items():
            absent = [f for f in _FIELDS[kind] if f not in spec]
            if absent:
                raise AdapterError(f"{directory / CONFIG}: {kind} entry {name!r} lacks {absent}")
    for key in ("base_fingerprint", "base_model", "base_model_type"):
        cfg.setdefault(key, None)
    try:
        tensors = load_file(str(directory / WEIGHTS))
    except Exception as e:
        raise AdapterError(f"cannot read {directory / WEIGHTS}: {type(e).__name__}: {e}") from None
    return cfg, tensors


def adapter_base_model(directory) -> str:
    """The base model an adapter was saved on (``base_model`` in its config): what commands given only
    ``--adapter`` load it onto."""
    directory = Path(directory)
    try:
        cfg = json.loads((directory / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{directory} is not a readable minimoe adapter ({type(e).__name__}: {e})") from None
    base, relative = cfg.get("base_model"), cfg.get("base_model_relative")
    if not base:
        raise AdapterError(f"{directory / CONFIG} records no base_model; pass --model")
    if not Path(base).is_dir() and relative and (directory / relative).is_dir():
        return str(os.path.normpath(directory / relative))  # the project was moved since the adapter was saved
    return base


def _check_targets(cfg: dict, modules: dict, directory) -> None:
    """Every module the config names exists, is still plain (no adapter yet) and fits its spec."""
    plain = {"expert_lora": StackedLinear, "lora": nn.Linear, "lora_moe": nn.Linear, "esft": StackedLinear}
    for kind in KINDS:
        for name, spec in cfg[kind].items():
            m = modules.get(name)
            if m is None:
                raise AdapterError(f"{directory}: the model has no module {name!r} ({kind})")
            if type(m) is not plain[kind]:
                what = "already has an adapter" if hasattr(m, "adapter_parameters") or hasattr(m, "trained") else \
                    f"is a {type(m).__name__}, not a {plain[kind].__name__}"
                raise AdapterError(f"{directory}: {name} {what} ({kind} in {CONFIG})")
            if kind == "expert_lora" and len(spec["ranks"]) != m.num_experts:
                raise AdapterError(f"{directory / CONFIG}: {name} lists {len(spec['ranks'])} ranks for "
                                   f"{m.num_experts} experts")
            if kind == "esft" and any(not 0 <= e < m.num_experts for e in spec["selected"]):
                raise AdapterError(f"{directory / CONFIG}: {name} selects experts outside 0..{m.num_experts - 1}")


def load_adapter(model, directory, check_base: bool = True):
    """Attach the adapters saved in ``directory`` to ``model`` (a base model without them) and load them.
    Everything is checked (base, modules, config against tensors) before the model changes."""
    cfg, tensors = read_adapter(directory)
    if check_base:
        fp = fingerprint(model, cfg.get("fingerprint_version") or 1)
        if fp != cfg["base_fingerprint"]:
            dtype, saved = str(model.dtype).replace("torch.", ""), cfg.get("base_dtype")
            hint = (f" (the adapter was saved on a {saved} base and this one is {dtype}: fingerprints agree "
                    "only across float32/bfloat16 loads)" if saved and dtype != saved and
                    "float16" in (dtype, saved) else "")
            raise AdapterError(
                f"{directory} was saved on base {cfg['base_model']!r} ({cfg['base_model_type']}, fingerprint "
                f"{cfg['base_fingerprint']}); this model is {model.config.name_or_path!r} "
                f"({model.config.model_type}, fingerprint {fp}): its config or weights differ{hint}. Pass "
                "check_base=False (--no-check-base) to load it anyway.")
    modules = dict(model.named_modules())
    _check_targets(cfg, modules, Path(directory))
    shapes = _expected_shapes(model, cfg)
    file = Path(directory) / WEIGHTS
    for name in cfg["lora_moe"]:  # hard counts, saved before routing statistics left the modules: not needed
        tensors.pop(f"{name}.counts", None)
    missing = [k for k in shapes if k not in tensors]
    unexpected = [k for k in tensors if k not in shapes]
    wrong = [f"{k}: {tuple(tensors[k].shape)} in the file, {shapes[k]} by the config"
             for k in shapes if k in tensors and tuple(tensors[k].shape) != shapes[k]]
    if missing or unexpected or wrong:
        raise AdapterError(f"{file} disagrees with its {CONFIG}: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}, wrong shapes {wrong[:5]}")
    g = torch.Generator().manual_seed(0)
    for name, spec in cfg["expert_lora"].items():
        _replace(model, name, ResizableLoRAExpert(modules[name], spec["rank"], spec["alpha"], ranks=spec["ranks"],
                                                  generator=g))
    for name, spec in cfg["lora"].items():
        _replace(model, name, LoRALinear(modules[name], spec["rank"], spec["alpha"], generator=g))
    for name, spec in cfg["lora_moe"].items():
        m = PrunableLoRAMoE(modules[name], len(spec["expert_ids"]), spec["top_k"], spec["rank"], spec["alpha"],
                            spec["renormalize"], generator=g)
        m.expert_ids.copy_(torch.tensor(spec["expert_ids"]))
        m.lb_enabled = spec["lb_enabled"]
        _replace(model, name, m)
    for name, spec in cfg["esft"].items():
        _replace(model, name, _selected_experts_cls()(modules[name], spec["selected"]))
    model._freeze_base()
    for m in model.modules():
        if type(m).__name__ == "SelectedExperts":
            m.trained.requires_grad_(True)

    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in cfg["expert_lora"]:
            m = modules[name]
            for e in range(m.num_experts):
                if m.rank_of(e):
                    m.lora[e].A[0].copy_(tensors[f"{name}.lora_A.{e}"])
                    m.lora[e].B[0].copy_(tensors[f"{name}.lora_B.{e}"])
        for name in [*cfg["lora"], *cfg["lora_moe"]]:
            m = modules[name]
            m.lora_A.copy_(tensors[f"{name}.lora_A"])
            m.lora_B.copy_(tensors[f"{name}.lora_B"])
            if name in cfg["lora_moe"]:
                m.router.weight.copy_(tensors[f"{name}.router.weight"])
        for name in cfg["esft"]:
            modules[name].trained.copy_(tensors[f"{name}.trained"])
    return model


