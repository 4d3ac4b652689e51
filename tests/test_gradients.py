"""Training-side parity: gradients equal transformers', autocast and activation checkpointing work, and
the grouped LoRA-on-experts path (with or without skipping rank-0 experts) equals the per-expert loop."""

import pytest
import torch
import torch.nn.functional as F

import minimoe
from minimoe.adapters.expert_lora import ResizableLoRAExpert
from minimoe.model.moe import Groups, StackedLinear


def _hf_grads(hf, ids, labels):
    hf.zero_grad()
    out = hf(ids, labels=labels, output_router_logits=hf.config.model_type != "qwen3")
    out.loss.backward()
    grads = {}
    for name, p in hf.named_parameters():
        name = name[len("model."):] if name.startswith("model.") else name
        if name.endswith("mlp.experts.gate_up_proj"):  # fused [E, 2I, H] -> our gate and up stacks
            gate, up = p.grad.chunk(2, dim=1)
            grads[name.replace("gate_up_proj", "gate_proj.weight")] = gate
            grads[name.replace("gate_up_proj", "up_proj.weight")] = up
        elif name.endswith("mlp.experts.down_proj"):
            grads[name + ".weight"] = p.grad
        else:
            grads[name] = p.grad
    return grads


@pytest.mark.parametrize("variant", ["olmoe", "qwen2_moe", "qwen3-tied", "qwen3_moe"])
def test_gradients_match_transformers(hf_checkpoint, variant):
    """Same loss (CE + coef · aux, as transformers trains) → same gradient on every parameter."""
    hf, directory = hf_checkpoint(variant)
    ours = minimoe.from_pretrained(directory).train()
    hf.train()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, :3] = hf.config.pad_token_id if hf.config.pad_token_id is not None else ids[0, :3]
    try:
        ref = _hf_grads(hf, ids, ids)
    finally:
        hf.eval()
    out = ours(ids, labels=ids)
    loss = out.loss if out.aux_loss is None else out.loss + ours.config.router_aux_loss_coef * out.aux_loss
    loss.backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert set(ours_grads) == set(ref) - ({"lm_head.weight"} if ours.tied else set())
    for name, g in ours_grads.items():
        scale = ref[name].abs().max().item() + 1e-12
        assert (g - ref[name]).abs().max().item() / scale < 1e-4, name


def test_olmoe_padding_row_gets_no_gradient(hf_checkpoint):
    _, directory = hf_checkpoint("olmoe")
    model = minimoe.from_pretrained(directory).train()
    pad = model.config.pad_token_id
    ids = torch.tensor([[pad, pad, 5, 6, 7]])
    model(ids, labels=ids).loss.backward()
    assert model.embed_tokens.weight.grad[pad].abs().sum() == 0


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_cpu_bf16_autocast_trains(hf_checkpoint, impl):
    _, directory = hf_checkpoint("qwen3_moe")
    model = minimoe.from_pretrained(directory).train()
    model.set_experts_implementation(impl)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert abs(out.loss.item() - ref.item()) < 0.05  # bf16 compute, fp32 master weights
    grad = model.layers[0].mlp.experts.up_proj.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients(hf_checkpoint):
    _, directory = hf_checkpoint("qwen2_moe")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for flag in (False, True):
        model = minimoe.from_pretrained(directory).train()
        model.gradient_checkpointing = flag
        out = model(ids, labels=ids, output_router=True)
        (out.loss + 0.01 * out.aux_loss).backward()
        assert len(out.router) == 2
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


# --- ResizableLoRAExpert: grouped path (dense packing or rank-0 skip) against the per-expert loop ---

COUNTS = [5, 0, 3, 9, 1, 0, 7, 2]  # uneven, experts 1 and 5 get no rows
RANK_PATTERNS = {
    "none-pruned": [4, 4, 2, 6, 4, 4, 4, 4],
    "half-pruned": [0, 4, 0, 6, 4, 0, 3, 0],
    "pruned-with-no-rows": [4, 0, 2, 6, 4, 0, 4, 4],
    "all-but-one-pruned": [0, 0, 0, 5, 0, 0, 0, 0],
    "all-but-one-pruned-and-it-has-no-rows": [0, 3, 0, 0, 0, 0, 0, 0],
}


def _expert_layer(ranks, in_f=32, out_f=24):
    """A layer with heterogeneous ranks, several chunks per expert (a grow) and non-zero B."""
    torch.manual_seed(0)
    base = StackedLinear(len(ranks), in_f, out_f)
    torch.nn.init.normal_(base.weight)
    layer = ResizableLoRAExpert(base, rank=4, alpha=8, ranks=ranks, generator=torch.Generator().manual_seed(1))
    adapted = [e for e, r in enumerate(ranks) if r]
    layer.grow({adapted[0]: 3}, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_(0, 0.3)
    return layer


def _run(layer, impl, x, counts):
    """Output, input gradient and every adapter parameter's gradient of one forward/backward."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = layer(x, Groups.from_counts(torch.tensor(counts), impl))
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return [y.detach(), x.grad] + [p.grad for p in layer.adapter_parameters()]


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "dense"])
@pytest.mark.parametrize("pattern", list(RANK_PATTERNS))
def test_grouped_lora_equals_the_loop_for_every_rank_pattern(pattern, skip, monkeypatch):
    """Forward, input gradient and every adapter gradient agree, whether the grouped path skips the
    rank-0 experts' rows or packs them as zero rows; rows of rank-0 experts get exactly 0."""
    ranks = RANK_PATTERNS[pattern]
    layer = _expert_layer(ranks)
    layer.skip_pruned_fraction = 0.0 if skip else 2.0
    seen = []  # offsets of the LoRA grouped matmuls (the base runs with all E groups)
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda a, b, **kw: (seen.append(kw["offs"].clone()), real(a, b, **kw))[1])
    x = torch.randn(sum(COUNTS), 32, generator=torch.Generator().manual_seed(3))
    loop = _run(layer, "loop", x, COUNTS)
    grouped = _run(layer, "grouped_mm", x, COUNTS)
    assert all(g is not None for g in grouped) and len(grouped) == len(loop)
    for a, b in zip(grouped, loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    rows = torch.repeat_interleave(torch.arange(8), torch.tensor(COUNTS))
    pruned_rows = torch.tensor(ranks)[rows] == 0
    delta = layer.lora_delta(x, Groups.from_counts(torch.tensor(COUNTS), "grouped_mm"))
    assert torch.equal(delta[pruned_rows], torch.zeros_like(delta[pruned_rows]))
    adapted = [e for e, r in enumerate(ranks) if r]
    lora_offs = seen[-2:]  # lora_delta's two grouped matmuls
    if skip and len(adapted) < 8:  # only the adapted experts' rows enter the LoRA matmuls
        expected = torch.cumsum(torch.tensor(COUNTS)[adapted], 0).to(torch.int32)
        assert all(torch.equal(o, expected) for o in lora_offs)
    else:
        assert all(torch.equal(o, torch.cumsum(torch.tensor(COUNTS), 0).to(torch.int32)) for o in lora_offs)


class _GroupedMMWithNaNTail(torch.autograd.Function):
    """grouped_mm as CUDA may behave: output rows past offs[-1], and the input-gradient rows there,
    are left unwritten; here they are NaN so that any read of them shows."""

    real = staticmethod(F.grouped_mm)

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        out = _GroupedMMWithNaNTail.real(a, b, offs=offs)
        out[int(offs[-1]):] = float("nan")
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, offs = ctx.saved_tensors
        with torch.enable_grad():
            a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
            ga, gb = torch.autograd.grad(_GroupedMMWithNaNTail.real(a_, b_, offs=offs), (a_, b_), grad)
        ga[int(offs[-1]):] = float("nan")
        return ga, gb, None


@pytest.mark.parametrize("pattern", ["half-pruned", "all-but-one-pruned", "all-but-one-pruned-and-it-has-no-rows"])
def test_skip_path_never_reads_rows_past_the_last_offset(pattern, monkeypatch):
    """With grouped_mm leaving NaN past offs[-1] (forward and input gradient), the skip path still gives
    exactly what it gives with CPU's grouped_mm, and matches the loop path; nothing is NaN."""
    layer = _expert_layer(RANK_PATTERNS[pattern])
    layer.skip_pruned_fraction = 0.0
    x = torch.randn(sum(COUNTS), 32, generator=torch.Generator().manual_seed(4))
    plain = _run(layer, "grouped_mm", x, COUNTS)
    monkeypatch.setattr(F, "grouped_mm", lambda a, b, *, offs: _GroupedMMWithNaNTail.apply(a, b, offs))
    nan_tail = _run(layer, "grouped_mm", x, COUNTS)
    loop = _run(layer, "loop", x, COUNTS)
    for a, b, c in zip(nan_tail, plain, loop):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_skip_threshold_is_a_host_side_fraction_of_pruned_experts():
    """Below ``skip_pruned_fraction`` of rank-0 experts the pruned ones are packed as zero rows."""
    layer = _expert_layer([4] * 8)
    layer.skip_pruned_fraction = 0.5
    for pruned, skips in ((1, False), (3, False), (4, True), (7, True)):
        layer.prune(range(pruned))
        plan = layer._plan()
        assert plan.skip == skips, pruned
        assert plan.groups == (8 - pruned if skips else 8)


def test_skip_path_under_bf16_autocast_matches_the_packed_path():
    """Under CPU autocast the LoRA matmuls run in bf16 on both grouped variants: same result, fp32 grads."""
    layer = _expert_layer(RANK_PATTERNS["half-pruned"])
    x = torch.randn(sum(COUNTS), 32, generator=torch.Generator().manual_seed(5))
    results = []
    for fraction in (0.0, 2.0):
        layer.skip_pruned_fraction = fraction
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_run(layer, "grouped_mm", x, COUNTS))
    assert results[0][0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in results[0][2:])
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
