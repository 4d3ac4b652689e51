"""Fold a fine-tune into something other tools load: merged base weights, or a PEFT adapter.

``export_merged`` folds every adapter into its base weight (``Adapter.merged_weight()``: LoRA, EPnG's
per-expert ranks, ESFT's trained experts) — fully fine-tuned weights are already in place — and writes the
Hub layout (per-expert keys, config.json, tokenizer files, generation_config.json) that transformers and
vLLM load. A LoRA-MoE cannot be merged: its router picks experts per token, so there is no single weight
to fold into; keep it in minimoe's native adapter format (``minimoe.save_adapter``).

``export_peft`` writes a PEFT (0.21, transformers v5) LoRA adapter: dense LoRA as ``target_modules``,
expert LoRA as ``target_parameters`` on the fused ``experts.gate_up_proj`` / ``experts.down_proj``.
PEFT has one rank per target, so every target is zero-padded to the largest per-expert rank R (exact:
padded rows and columns contribute nothing, pruned experts are all-zero blocks) and each module's
scaling is folded into its B (``lora_alpha = r = R``). Not representable: LoRA-MoE (routers), ESFT and
full fine-tuning (use ``export_merged``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .base import AdapterError, adapters_of, base_state_dict
from ..utils.files import atomic_dir, check_destination
from ..model.hf import resolve, write_hub_checkpoint


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """Base-named tensors with every adapter folded in (``merged_weight()``: ``W + s·B·A`` computed in fp32,
    ESFT's trained experts in place)."""
    adapters = adapters_of(model)
    unmergeable = [n for n, m in adapters.items() if not m.mergeable]
    if unmergeable:
        more = " ..." if len(unmergeable) > 3 else ""
        raise AdapterError(f"LoRA-MoE modules ({', '.join(unmergeable[:3])}{more}) cannot be merged into dense "
                           "weights: their routers choose experts per token. Save them in minimoe's native format "
                           "with minimoe.save_adapter(model, dir) instead.")
    state = base_state_dict(model)
    with torch.no_grad():
        for name, m in adapters.items():
            state[f"{name}.weight"] = m.merged_weight().detach()
    return state


def _source_dir(model) -> Path | None:
    try:
        return resolve(model.config.name_or_path) if model.config.name_or_path else None
    except FileNotFoundError:
        return None


def export_merged(model, directory, overwrite: bool = False, state: dict | None = None) -> Path:
    """Fold adapters into the base weights and write a Hub-layout checkpoint that transformers loads.
    An existing ``directory`` is refused (unless ``overwrite``) before any tensor is built. ``state``: the
    merged tensors when the caller already has them (a sharded model's, gathered by every process)."""
    check_destination(directory, overwrite)
    state = merged_state_dict(model) if state is None else state
    with atomic_dir(directory, overwrite) as tmp:
        write_hub_checkpoint(model, state, tmp, _source_dir(model))
    return Path(directory)


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else f"model.{name}"


def _peft_rank(dense: dict, experts: dict) -> int:
    """The one PEFT rank that holds every target: dense ranks, and per expert the fused gate+up rank
    (r_gate + r_up) and the down rank."""
    ranks = [m.rank for m in dense.values()]
    for mods in experts.values():
        gate_up = [mods[t].ranks for t in ("gate_proj", "up_proj") if t in mods]
        if gate_up:
            ranks.append(int(sum(gate_up).max()))
        if "down_proj" in mods:
            ranks.append(int(mods["down_proj"].ranks.max()))
    return max(max(ranks), 1)


def peft_tensors(model) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT adapter tensors and adapter_config.json for the model's LoRA (see the module docstring)."""
    adapters = adapters_of(model)
    unsupported = [n for n, m in adapters.items() if m.kind not in ("lora", "expert_lora")]
    if unsupported:
        raise AdapterError(f"PEFT cannot represent {unsupported[0]} (LoRA-MoE routers / ESFT expert weights): "
                           "use minimoe.save_adapter, or export_merged where the adapter can be merged")
    dense = {n: m for n, m in adapters.items() if m.kind == "lora"}
    experts = model.expert_lora_modules()
    if not dense and not experts:
        raise AdapterError("the model has no LoRA to export")
    R = _peft_rank(dense, experts)
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    for name, m in dense.items():
        A = torch.zeros(R, m.in_features)
        B = torch.zeros(m.out_features, R)
        A[:m.rank], B[:, :m.rank] = m.lora_A.detach().float().cpu(), m.scaling * m.lora_B.detach().float().cpu()
        out[f"{prefix}{_hf_name(name)}.lora_A.weight"], out[f"{prefix}{_hf_name(name)}.lora_B.weight"] = A, B
    targets = []
    for layer, mods in experts.items():
        base = f"{prefix}model.layers.{layer}.mlp.experts"
        pairs = []  # (target parameter, [(module, row offset in the fused output)])
        if "gate_proj" in mods or "up_proj" in mods:
            pairs.append(("gate_up_proj", [(mods.get("gate_proj"), 0), (mods.get("up_proj"), 1)]))
        if "down_proj" in mods:
            pairs.append(("down_proj", [(mods["down_proj"], 0)]))
        for i, (param, parts) in enumerate(pairs):
            ref = next(m for m, _ in parts if m is not None)
            E, fin = ref.num_experts, ref.in_features
            fout = ref.out_features * (2 if param == "gate_up_proj" else 1)
            A = torch.zeros(E, R, fin)
            B = torch.zeros(fout, R, E)  # PEFT's column layout: rank-major, expert fastest
            for e in range(E):
                col = 0
                for m, half in parts:
                    if m is None or not m.rank_of(e):
                        continue
                    r = m.rank_of(e)
                    rows = slice(half * m.out_features, (half + 1) * m.out_features)
                    A[e, col:col + r] = m.lora_A_of(e).detach().float().cpu()
                    B[rows, col:col + r, e] = m.scaling * m.lora_B_of(e).detach().float().cpu()
                    col += r
            # two targets on one module nest: gate_up_proj inside (base_layer), down_proj outside
            where = f"{base}.base_layer" if (len(pairs) == 2 and i == 0) else base
            out[f"{where}.lora_A.weight"] = A.reshape(E * R, fin)
            out[f"{where}.lora_B.weight"] = B.reshape(fout, R * E)
            targets.append(f"model.layers.{layer}.mlp.experts.{param}")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model.config.name_or_path,
              "r": R, "lora_alpha": R, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "rank_pattern": {},
              "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True,
              "target_modules": sorted(_hf_name(n) for n in dense) or None,
              "target_parameters": sorted(set(targets)) or None}
    return {k: v.to(model.dtype).contiguous() for k, v in out.items()}, config


def export_peft(model, directory, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json``).
    An existing ``directory`` is refused (unless ``overwrite``) before any tensor is built."""
    check_destination(directory, overwrite)
    tensors, config = peft_tensors(model)
    with atomic_dir(directory, overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
        (tmp / "README.md").write_text(
            f"# PEFT LoRA adapter exported by minimoe\n\nBase model: `{config['base_model_name_or_path']}`.\n"
            f"Every target is zero-padded to rank r={config['r']} (exact) and each module's LoRA scaling is folded "
            "into its lora_B (lora_alpha = r, so PEFT's scaling is 1). Load with "
            "`PeftModel.from_pretrained(model, this_dir)` on transformers v5 with peft >= 0.19.\n")
    return Path(directory)
