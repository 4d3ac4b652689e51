"""The numerical checks of ``minimoe check``: parity, the expert paths, adapter gradients.

Each check builds tiny models on the CPU in fp32 (the reference), copies them to the device under test
and compares. Weights are drawn as in the project's parity tests (norms ~1 ± 0.2, the rest 0.15·N(0, 1)):
with a real checkpoint's 0.02 init every logit is ~0 and nothing would be compared. Every check returns a
``Result``; the tolerances sit next to the comparisons that use them. transformers is never imported
here: the reference model comes from the benchmark's reference routes (``minimoe.tools.bench.reference`` finds them).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapters.adamw import AdamW
from ..adapters.base import adapters_of
from ..adapters.lm import CausalLM
from ..model.config import preset
from ..model.hf import to_hub_state_dict
from ..model.moe import grouped_mm_supported
from ..policies.dmep import lb_loss

# Tolerances (every number the table prints is compared against one of these)
FP32_TOL = 1e-4  # fp32 logits: max |device - cpu| / max(1, max |cpu|) (reduction order only)
BF16_REL_TOL = 3e-2  # bf16: ||x - ref|| / ||ref|| (bf16 rounds at 2^-8 ≈ 4e-3); for logits the median over
# positions: in bf16 a few positions route to another expert (a near tie in the router), and their error,
# reported as "worst", is not judged
PATHS_FP32_TOL = 1e-5  # grouped_mm vs loop in fp32: max abs diff / max(1, max |loop|), logits and grads
GRAD_FP32_TOL = 1e-4  # adapter gradients, device fp32 vs cpu fp32: max abs diff / max |cpu grad|
GRAD_BF16_REL_TOL = 0.1  # bf16 base vs cpu fp32: ||g - ref|| / ||ref|| per adapter class; measured on CPU
# 2e-2 (LoRA, expert LoRA) and 5e-2 (LoRA-MoE, whose top-2 router flips near ties); a wrong gradient is ~1


@dataclass
class Result:
    status: str  # PASS, FAIL or SKIP
    detail: str


def verdict(ok: bool, detail: str) -> Result:
    return Result("PASS" if ok else "FAIL", detail)


def bf16_supported(device: str) -> bool:
    return device.startswith("cpu") or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max(1, max |ref|), on the CPU in fp32."""
    a, ref = a.detach().float().cpu(), ref.detach().float().cpu()
    return float((a - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def norm_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| (0 when both are 0)."""
    a, ref = a.detach().float().cpu(), ref.detach().float().cpu()
    return float((a - ref).norm()) / max(float(ref.norm()), 1e-30)


def positions_rel(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(median, max) over positions of ||a_t - ref_t|| / ||ref_t|| for logits ``(..., V)``."""
    a, ref = a.detach().float().cpu().flatten(0, -2), ref.detach().float().cpu().flatten(0, -2)
    r = (a - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
    return float(r.median()), float(r.max())


def bf16_logits(ours: torch.Tensor, ref: torch.Tensor) -> tuple[bool, str]:
    med, worst = positions_rel(ours, ref)
    return med <= BF16_REL_TOL, f"bf16 median {med:.1e} (tol {BF16_REL_TOL:g}, worst {worst:.1e})"


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def randomize_lora_B(model: torch.nn.Module, seed: int = 1) -> None:
    """LoRA B starts at zero: give it values so that every delta (and A's gradient) shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".B." in name or name.endswith("lora_B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def tiny(name: str, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return randomize(CausalLM(preset(name)), seed)


def ids_for(model: CausalLM, shape=(2, 16), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def on_device(model: CausalLM, device: str, base_dtype: torch.dtype = torch.float32) -> CausalLM:
    """A copy on ``device`` with the frozen base in ``base_dtype`` and the adapters kept fp32 (as `minimoe train`'s
    ``--dtype`` does)."""
    model = copy.deepcopy(model)
    adapter = {id(p) for p in model.adapter_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in adapter:
                p.data = p.data.to(base_dtype)
    return model.to(device)


def logits(model: torch.nn.Module, ids: torch.Tensor, device: str) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids.to(device)).logits.float().cpu()


# --- 1. parity ---------------------------------------------------------------------------------------
def parity(family: str, device: str, quick: bool) -> Result:
    """The same weights on the device (fp32, bf16) against the CPU in fp32."""
    cpu = tiny(family)
    ids = ids_for(cpu)
    ref = logits(cpu, ids, "cpu")
    d32 = max_rel(logits(on_device(cpu, device), ids, device), ref)
    ok, detail = d32 <= FP32_TOL, f"fp32 max {d32:.1e} (tol {FP32_TOL:g})"
    if bf16_supported(device):
        good, text = bf16_logits(logits(on_device(cpu, device, torch.bfloat16), ids, device), ref)
        ok, detail = ok and good, f"{detail}; {text}"
    else:
        detail += "; bf16 not supported here"
    return verdict(ok, detail)


def transformers_parity(family: str, device: str, quick: bool) -> Result:
    """minimoe against transformers' model of the same weights on the same device (fp32 tight, bf16 relative)."""
    from .bench import reference

    if why := reference.unavailable():
        return Result("SKIP", why)
    routes = reference.load()
    cpu = tiny(family)
    ids = ids_for(cpu)
    parts, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        state = to_hub_state_dict(cpu.state_dict())
        if cpu.tied:  # one tensor on disk, as transformers writes a tied checkpoint
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / "model.safetensors"))
        (Path(tmp) / "config.json").write_text(json.dumps(cpu.config.to_hf_config()))
        dtypes = [torch.float32] + ([torch.bfloat16] if bf16_supported(device) else [])
        for dtype in dtypes:
            with contextlib.redirect_stderr(io.StringIO()):  # transformers' loading progress bar
                hf = routes.setup("full", "eager", Path(tmp), device, dtype)[0].eval()
            ours = logits(on_device(cpu, device, dtype), ids, device)
            with torch.no_grad():
                theirs = hf(ids.to(device)).logits.float().cpu()
            del hf
            if dtype == torch.float32:
                d = max_rel(ours, theirs)
                ok &= d <= FP32_TOL
                parts.append(f"fp32 max {d:.1e} (tol {FP32_TOL:g})")
            else:
                good, text = bf16_logits(ours, theirs)
                ok &= good
                parts.append(text)
    return verdict(ok, "; ".join(parts))


# --- 2. expert paths ---------------------------------------------------------------------------------
def _run_paths(model: CausalLM, ids: torch.Tensor, device: str, params) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    out = model.train()(ids.to(device), labels=ids.to(device))
    (out.loss + 0.01 * out.aux_loss).backward()
    return out.logits.detach().float().cpu(), [p.grad.detach().float().cpu() for p in params(model)]


def _compare(a, b, dtype) -> tuple[bool, float]:
    """Logits and gradients: (within tolerance, worst measured) for fp32 (max) or bf16 (relative norm)."""
    (la, ga), (lb, gb) = a, b
    if dtype == torch.float32:
        worst = max([max_rel(la, lb)] + [max_rel(x, y) for x, y in zip(ga, gb, strict=True)])
        return worst <= PATHS_FP32_TOL, worst
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    worst = max(positions_rel(la, lb)[0], norm_rel(flat(ga), flat(gb)))
    return worst <= BF16_REL_TOL, worst


def _tol(dtype) -> str:
    return (f"max {PATHS_FP32_TOL:g}" if dtype == torch.float32
            else f"logits median / grads rel {BF16_REL_TOL:g}")


def expert_paths(dtype: torch.dtype, device: str, quick: bool) -> Result:
    """grouped_mm and the per-expert loop agree: logits and every gradient (tiny-olmoe, 256 routed rows)."""
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.bfloat16 and not bf16_supported(device):
        return Result("SKIP", f"{name} not supported on {device}")
    cpu = tiny("tiny-olmoe")
    w = torch.empty(1, 32, 64, dtype=dtype, device=device)
    if not grouped_mm_supported(w[0], w):
        return Result("SKIP", f"grouped_mm does not run in {name} on {device}: 'auto' uses the loop path, "
                              "nothing to compare")
    ids = ids_for(cpu, (4, 32))
    runs = {}
    for impl in ("grouped_mm", "loop"):
        model = copy.deepcopy(cpu).to(device=device, dtype=dtype)
        model.set_experts_implementation(impl)
        runs[impl] = _run_paths(model, ids, device, lambda m: list(m.parameters()))
    ok, worst = _compare(runs["grouped_mm"], runs["loop"], dtype)
    return verdict(ok, f"fwd+grads worst {worst:.1e} ({_tol(dtype)})")


def lora_skip_path(device: str, quick: bool) -> Result:
    """ResizableLoRAExpert with 5 of 8 experts pruned per layer: the skip path (rows of pruned experts
    bypass the LoRA matmuls) against the packed path and the loop, logits and adapter gradients."""
    cpu = tiny("tiny-olmoe")
    cpu.add_expert_lora(rank=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj"),
                        generator=torch.Generator().manual_seed(0))
    cpu.grow_expert_lora({0: {1: 12, 4: 3}}, generator=torch.Generator().manual_seed(1))
    cpu.prune_expert_lora({layer: [0, 2, 3, 5, 6] for layer in cpu.config.moe_layers})
    randomize_lora_B(cpu)
    ids = ids_for(cpu, (4, 32))
    parts, ok, ran = [], True, False
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.empty(1, 32, 64, dtype=dtype, device=device)
        if (dtype == torch.bfloat16 and not bf16_supported(device)) or not grouped_mm_supported(w[0], w):
            continue  # no grouped path in this dtype here: nothing to compare
        runs = {}
        for variant, impl, fraction in (("skip", "grouped_mm", 0.5), ("packed", "grouped_mm", 2.0),
                                        ("loop", "loop", 0.5)):
            model = on_device(cpu, device, dtype)
            model.set_experts_implementation(impl)
            mods = [m for layer in model.expert_lora_modules().values() for m in layer.values()]
            for m in mods:
                m.skip_pruned_fraction = fraction
            runs[variant] = _run_paths(model, ids, device, lambda m: m.adapter_parameters())
            if variant == "skip" and not all(m._plan().skip for m in mods):
                return Result("FAIL", "the skip path was not taken with 5 of 8 experts pruned")
        for other in ("packed", "loop"):
            good, worst = _compare(runs["skip"], runs[other], dtype)
            ok &= good
            parts.append(f"{str(dtype)[6:]} skip-vs-{other} {worst:.1e}")
        parts[-1] += f" ({_tol(dtype)})"
        ran = True
    if not ran:
        return Result("SKIP", f"grouped_mm runs in no dtype on {device}: no skip path")
    return verdict(ok, "; ".join(parts))


# --- 3. adapter gradients and optimizer state ------------------------------------------------------------
def _adapter_models() -> list[CausalLM]:
    """LoRALinear + ResizableLoRAExpert on tiny-olmoe; PrunableLoRAMoE on tiny-qwen3 (both B randomized)."""
    g = torch.Generator().manual_seed(0)
    moe = tiny("tiny-olmoe")
    moe.add_lora(rank=4, alpha=8, targets=("q_proj", "v_proj"), generator=g)
    moe.add_expert_lora(rank=4, alpha=8, generator=g)
    dense = tiny("tiny-qwen3")
    dense.add_lora_moe(num_experts=4, top_k=2, rank=4, alpha=8, targets=("q_proj", "up_proj"), generator=g)
    for m in (moe, dense):
        randomize_lora_B(m)
    return [moe, dense]


def _adapter_grads(model: CausalLM, ids: torch.Tensor, device: str) -> dict[str, list[torch.Tensor]]:
    """``{adapter class: [grad, ...]}`` after one forward+backward of loss (+ LoRA-MoE's LB loss)."""
    model.zero_grad(set_to_none=True)
    out = model.train()(ids.to(device), labels=ids.to(device))
    loss = out.loss if out.adapter_balancing is None else out.loss + lb_loss(out)  # DMEP's LB term, as in training
    loss.backward()
    grads: dict[str, list[torch.Tensor]] = {}
    for adapter in adapters_of(model).values():
        grads.setdefault(type(adapter).__name__, []).extend(
            p.grad.detach().float().cpu() for p in adapter.adapter_parameters())
    return grads


def adapter_gradients(device: str, quick: bool) -> Result:
    """Adapter gradients on the device (fp32; bf16 base with fp32 adapters) against the CPU in fp32."""
    parts, ok = [], True
    dtypes = [torch.float32] + ([torch.bfloat16] if bf16_supported(device) else [])
    for dtype in dtypes:
        worst: dict[str, float] = {}
        for cpu in _adapter_models():
            ids = ids_for(cpu, (2, 24))
            dev = on_device(cpu, device, dtype)  # (copied before any backward: deepcopy needs graph leaves)
            ref = _adapter_grads(cpu, ids, "cpu")
            got = _adapter_grads(dev, ids, device)
            for kind, gs in ref.items():
                if dtype == torch.float32:
                    scale = max(float(g.abs().max()) for g in gs)
                    d = max(float((a - b).abs().max()) for a, b in zip(got[kind], gs, strict=True)) / scale
                else:
                    d = norm_rel(torch.cat([a.flatten() for a in got[kind]]), torch.cat([b.flatten() for b in gs]))
                worst[kind] = max(worst.get(kind, 0.0), d)
        tol = GRAD_FP32_TOL if dtype == torch.float32 else GRAD_BF16_REL_TOL
        ok &= all(v <= tol for v in worst.values())
        parts.append(f"{str(dtype)[6:]} " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + f" (tol {tol:g})")
    return verdict(ok, "; ".join(parts))


def _optimizer_snapshot(model: CausalLM, opt: torch.optim.Optimizer):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for n, p in model.named_parameters() if p in opt.state}
    return params, state, _group_names(model, opt)


def _group_names(model: CausalLM, opt: torch.optim.Optimizer) -> list[list[str]]:
    """Param groups as parameter names (a resize replaces the tensors; their names stay)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def grow_shrink_state(device: str, quick: bool) -> Result:
    """Grow then shrink the expert LoRA after 3 AdamW steps: parameters, optimizer state and the param
    groups are what they were, bit for bit (foreach and fused AdamW)."""
    problems = []
    for kind in ("foreach", "fused"):
        model = on_device(tiny("tiny-olmoe"), device)
        model.add_expert_lora(rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
        opt = AdamW(model.adapter_parameters(), lr=1e-2, weight_decay=0.1, **{kind: True})
        for i in range(3):
            ids = ids_for(model, (2, 12), seed=3 + i).to(device)
            model.train()(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        params, state, layout = _optimizer_snapshot(model, opt)
        plan = {0: {2: 4, 3: 6}, 1: {7: 5}}
        model.grow_expert_lora(plan, optimizer=opt, generator=torch.Generator().manual_seed(1))
        model.shrink_expert_lora(plan, optimizer=opt)
        now = dict(model.named_parameters())
        if _group_names(model, opt) != layout or set(now) != set(params):
            problems.append(f"{kind}: parameter layout changed")
            continue
        for n, p in now.items():
            if not torch.equal(p, params[n]):
                problems.append(f"{kind}: {n} changed")
            for k, v in state.get(n, {}).items():
                same = torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v
                if not same:
                    problems.append(f"{kind}: state {k} of {n} changed")
    if problems:
        return Result("FAIL", "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
    return Result("PASS", "foreach and fused AdamW: parameters and state bit-identical (exact)")
