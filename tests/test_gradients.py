"""Training-side parity: gradients equal transformers', autocast and activation checkpointing work."""

import pytest
import torch

import minimoe


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
