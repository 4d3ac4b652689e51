"""Adapter files: ``save_adapter(model, dir)`` and ``model.load_adapter(dir)``.

``dir/adapter_config.json`` says what the adapter is; ``dir/adapter.safetensors`` holds its tensors,
``{module path}.{suffix}`` for each adapter's ``adapter_tensors()`` (see ``adapters/base.py``):

    expert LoRA   {module}.lora_A.{e} [r_e, in], {module}.lora_B.{e} [out, r_e]   (experts with r_e > 0)
    LoRA          {module}.lora_A [r, in], {module}.lora_B [out, r]
    LoRA-MoE      {module}.lora_A [E', r, in], .lora_B [E', out, r], .router.weight [E', in]
    ESFT          {module}.trained [n_selected, out, in]; a shared expert trained in full: {module}.trained [out, in]

The config records, per kind, each module's ``spec()`` (rank(s), alpha and scaling, the per-expert ranks
(EPnG; files written before the rows were flat also list growth chunks), the surviving LoRA-MoE experts with their original indices (DMEP), ESFT's selected
experts), the base model id and a fingerprint of the base weights and config; loading onto another base,
or a file whose shapes disagree with the config, is an error that says so. Nothing here knows a kind:
each adapter class describes, rebuilds and loads itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .base import KINDS, Adapter, AdapterError, adapters_of, base_state_dict, replace_module
from .expert_lora import ResizableLoRAExpert
from ..utils.files import atomic_dir
from .lora import LoRALinear
from .lora_moe import PrunableLoRAMoE
from .selected import SelectedExperts
from .trained import TrainedLinear

FORMAT = "minimoe-adapter"
CONFIG, WEIGHTS = "adapter_config.json", "adapter.safetensors"
# every kind registers itself in KINDS by subclassing Adapter; the order of the file's sections:
ORDER = [cls.kind for cls in (ResizableLoRAExpert, LoRALinear, PrunableLoRAMoE, SelectedExperts, TrainedLinear)]
__all__ = ["AdapterError", "adapter_base_model", "adapter_config", "fingerprint", "load_adapter", "read_adapter",
           "save_adapter"]

FINGERPRINT_VERSION = 2


def fingerprint(model, version: int = FINGERPRINT_VERSION) -> str:
    """A short hash of the base model.

    Version 2: its config (less the dtype) and, per base tensor, name, shape, sum and 64 evenly strided
    values, all taken after rounding to bfloat16, so fp32 and bf16 loads of one checkpoint agree while a
    different checkpoint (or permuted rows) does not. (A float16 load rounds differently and does not
    agree.) Version 1 (adapters saved before ``fingerprint_version`` was recorded): the full config and,
    per tensor, name, shape, fp64 sum and first 8 values."""
    base = base_state_dict(model)
    if version == 1:
        h = hashlib.sha256(json.dumps(model.config.to_hf_config(), sort_keys=True).encode())
        for name, t in base.items():
            t = t.detach()
            head = t.flatten()[:8].double().cpu().tolist()
            h.update(f"{name}|{tuple(t.shape)}|{t.double().sum().item():.6e}|{head}".encode())
        return h.hexdigest()[:16]
    hf = {k: v for k, v in model.config.to_hf_config().items() if k not in ("dtype", "torch_dtype")}
    h = hashlib.sha256(json.dumps(hf, sort_keys=True).encode())
    for name, t in base.items():
        r = t.detach().to(torch.bfloat16)
        flat = r.flatten()
        sample = flat[:: max(1, flat.numel() // 64)][:64].double().cpu().tolist()
        total = torch.sum(r, dtype=torch.float64).item()
        h.update(f"{name}|{tuple(t.shape)}|{total:.6e}|{sample}".encode())
    return h.hexdigest()[:16]


def adapter_config(model, base_fingerprint: str | None = None) -> dict:
    """What ``save_adapter`` records: each adapter's spec under its kind, plus the base model's identity
    (``base_fingerprint``: computed here unless given, e.g. taken before the base was sharded)."""
    cfg = {"format": FORMAT, "version": 1, "base_model": model.config.name_or_path,
           "base_fingerprint": base_fingerprint or fingerprint(model), "fingerprint_version": FINGERPRINT_VERSION,
           "base_dtype": str(model.dtype).replace("torch.", ""), "base_model_type": model.config.model_type,
           **{kind: {} for kind in ORDER}}
    for name, m in adapters_of(model).items():
        cfg[m.kind][name] = m.spec()
    cfg["kinds"] = [k for k in ORDER if cfg[k]]
    return cfg


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": v.detach().contiguous().cpu()
            for name, m in adapters_of(model).items() for key, v in m.adapter_tensors().items()}


def save_adapter(model, directory, overwrite: bool = False, base_fingerprint: str | None = None) -> Path:
    """Write the model's adapters (and their layout) to ``directory``, atomically."""
    cfg = adapter_config(model, base_fingerprint)
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
    unknown = [k for k in cfg.get("kinds", []) if k not in KINDS]
    if unknown:
        raise AdapterError(f"{directory / CONFIG}: adapter kinds {unknown} are unknown to this minimoe "
                           f"(known: {list(KINDS)})")
    for kind, cls in KINDS.items():
        cfg[kind] = cfg.get(kind) or {}
        for name, spec in cfg[kind].items():
            absent = [f for f in cls.required if f not in spec]
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


def _entries(cfg: dict) -> list[tuple[str, type[Adapter], dict]]:
    return [(name, KINDS[kind], spec) for kind in KINDS for name, spec in cfg[kind].items()]


def _check_targets(cfg: dict, modules: dict, directory: Path) -> None:
    """Every module the config names exists, is still plain (no adapter yet) and fits its spec."""
    for name, cls, spec in _entries(cfg):
        m = modules.get(name)
        if m is None:
            raise AdapterError(f"{directory}: the model has no module {name!r} ({cls.kind})")
        if type(m) is not cls.base_type:
            what = "already has an adapter" if isinstance(m, Adapter) else \
                f"is a {type(m).__name__}, not a {cls.base_type.__name__}"
            raise AdapterError(f"{directory}: {name} {what} ({cls.kind} in {CONFIG})")
        problem = cls.check_spec(m, spec)
        if problem:
            raise AdapterError(f"{directory / CONFIG}: {cls.kind} entry {name} {problem}")


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
    for name in cfg["lora_moe"]:  # hard counts, saved before routing statistics left the modules: not needed
        tensors.pop(f"{name}.counts", None)
    shapes = {f"{name}.{k}": v for name, cls, spec in _entries(cfg)
              for k, v in cls.expected_shapes(modules[name], spec).items()}
    file = Path(directory) / WEIGHTS
    missing = [k for k in shapes if k not in tensors]
    unexpected = [k for k in tensors if k not in shapes]
    wrong = [f"{k}: {tuple(tensors[k].shape)} in the file, {shapes[k]} by the config"
             for k in shapes if k in tensors and tuple(tensors[k].shape) != shapes[k]]
    if missing or unexpected or wrong:
        raise AdapterError(f"{file} disagrees with its {CONFIG}: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}, wrong shapes {wrong[:5]}")
    g = torch.Generator().manual_seed(0)  # the values are overwritten: any initialisation will do
    for name, cls, spec in _entries(cfg):
        adapter = cls.from_spec(modules[name], spec, g)
        prefix = f"{name}."
        adapter.load_adapter_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        replace_module(model, name, adapter)
    model._freeze_base()
    return model
