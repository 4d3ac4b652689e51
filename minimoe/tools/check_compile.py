"""Self-checks of the compiled and packed paths (``minimoe check``): what a GPU is first needed to confirm.

* ``compiled blocks``: expert LoRA and LoRA on a tiny OLMoE on the device, each decoder block compiled
  (``--compile``), against the same model's eager blocks on the same weights — loss and adapter gradients —
  before and after a grow and a prune (the recompile). Inductor, but ``aot_eager`` on the CPU with
  ``--quick`` (tracing without code generation: seconds instead of a minute). On CUDA under bf16 autocast,
  as ``minimoe train`` runs.
* ``packed attention``: packed rows attended with FlexAttention against SDPA's dense block mask (logits, and
  on CUDA the adapter gradients too; FlexAttention has no backward on the CPU).
"""

from __future__ import annotations

import contextlib

import torch

from ..data.packing import pack, position_ids
from ..model.compiling import compile_layers
from . import check_numerics as num
from .check_numerics import Result, verdict

COMPILED_FP32_TOL = 1e-5  # fp32: a compiled graph reorders float operations, no more (relative)
COMPILED_BF16_TOL = 1e-2  # bf16 autocast: rounding of bf16 intermediates computed in another order (relative)


def _model(device: str):
    g = torch.Generator().manual_seed(0)
    model = num.tiny("tiny-olmoe")
    model.add_expert_lora(rank=8, alpha=16, generator=g)
    model.add_lora(rank=4, alpha=8, targets=("q_proj", "v_proj"), generator=g)
    num.randomize_lora_B(model)
    return model.to(device).train()


def _autocast(device: str):
    cuda = device.startswith("cuda")
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


def _loss_and_grads(model, ids, device, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    with _autocast(device):
        loss = model(ids, labels=ids, **kwargs).loss
    grads = torch.autograd.grad(loss, model.adapter_parameters())
    return loss.detach().float().cpu(), torch.cat([g.detach().float().cpu().flatten() for g in grads])


def compiled_blocks(device: str, quick: bool) -> Result:
    """Compiled blocks against eager ones on the same weights, before and after a grow and a prune."""
    model = _model(device)
    backend = "aot_eager" if quick and device == "cpu" else "inductor"
    log = compile_layers(model, backend=backend)
    compiled, ids = model.compiled_layers, num.ids_for(model, (2, 24)).to(device)
    tol = COMPILED_BF16_TOL if device.startswith("cuda") else COMPILED_FP32_TOL
    worst_loss = worst_grad = 0.0
    for event in range(2):
        model.compiled_layers = compiled
        loss_c, grad_c = _loss_and_grads(model, ids, device)
        model.compiled_layers = None
        loss_e, grad_e = _loss_and_grads(model, ids, device)
        worst_loss = max(worst_loss, float((loss_c - loss_e).abs() / loss_e.abs()))
        worst_grad = max(worst_grad, num.norm_rel(grad_c, grad_e))
        layers = model.config.moe_layers  # EPnG's kind of event: the shapes change, the blocks recompile
        model.grow_expert_lora({layer: {event: 8} for layer in layers}, generator=torch.Generator().manual_seed(event))
        model.prune_expert_lora({layer: [event + 1] for layer in layers})
    model.compiled_layers = compiled
    total = log.total()
    ok = worst_loss <= tol and worst_grad <= tol and total["eager_frames"] == 0
    return verdict(ok, f"{backend}: loss {worst_loss:.1e}, gradients {worst_grad:.1e} (tol {tol:g}) through a grow "
                       f"and a prune; {total['graphs']} graphs, {total['eager_frames']} fell back to eager")


def packed_attention(device: str, quick: bool) -> Result:
    """FlexAttention's block mask against SDPA's dense block mask on packed rows (every declared torch has it)."""
    model = _model(device)
    g = torch.Generator().manual_seed(2)
    examples = [(torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist(),) * 2 for n in (7, 12, 5, 9)]
    rows = pack(examples, 20, seed=0)
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (row, _, _) in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    kwargs = dict(attention_mask=mask.to(device), position_ids=position_ids(rows, width).to(device))
    ids, real = ids.to(device), mask.bool()
    out = {}
    for choice in ("sdpa", "flex"):
        model.packed_attention = choice
        if device.startswith("cuda"):  # forward and backward
            out[choice] = _loss_and_grads(model, ids, device, **kwargs)
        else:
            with torch.no_grad():
                out[choice] = (None, model(ids, **kwargs).logits.float().cpu()[real])
    model.packed_attention = "auto"
    tol = COMPILED_BF16_TOL if device.startswith("cuda") else COMPILED_FP32_TOL
    d = num.norm_rel(out["flex"][1], out["sdpa"][1])
    what = "adapter gradients" if device.startswith("cuda") else "logits (forward only on the CPU)"
    return verdict(d <= tol, f"{what} {d:.1e} (tol {tol:g}), {len(rows)} packed rows")
