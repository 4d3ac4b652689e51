"""PrunableLoRAMoE (DMEP's module): routing, counts, load-balancing loss, physical expert pruning."""

import pytest
import torch
from torch import nn

import minimoe
from minimoe import optim
from minimoe.adapters.lora_moe import PrunableLoRAMoE
from minimoe.policies.stats import RoutingStats

# factory, state tensors shaped like the parameter (moments), bytes of scalar state per parameter
OPTIMIZERS = {
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), 2, 4),
    "adamw-foreach": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), 2, 4),
    "adamw-fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), 2, 4),
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), 1, 0),
}


def _module(E=8, k=2, r=4, renormalize=True, seed=0, in_f=16, out_f=24):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    m = PrunableLoRAMoE(base, E, k, r, alpha=8, renormalize=renormalize, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1)
    return m


def _reference(m, x):
    """The DMEP formula written out per token: y = W0 x + b + s Σ_{i∈topk} g_i B_i A_i x."""
    probs = torch.softmax(x @ m.router.weight.T, -1)
    w, idx = probs.topk(m.top_k, -1)
    if m.renormalize:
        w = w / w.sum(-1, keepdim=True)
    y = x @ m.weight.T + m.bias
    for n in range(x.shape[0]):
        for j in range(m.top_k):
            i = idx[n, j]
            y[n] += m.scaling * w[n, j] * (m.lora_B[i] @ (m.lora_A[i] @ x[n]))
    return y


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_forward_is_the_dmep_formula(renormalize, impl):
    m = _module(renormalize=renormalize)
    m.implementation = impl
    x = torch.randn(10, 16)
    with torch.no_grad():
        assert torch.allclose(m(x), _reference(m, x), atol=1e-5)


def test_hard_counts_use_real_tokens_in_training_forwards_only():
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-qwen3"))
    model.add_lora_moe(num_experts=8, top_k=2, rank=2, targets=("q_proj",))
    name = "layers.0.self_attn.q_proj"
    m = model.get_submodule(name)
    inputs = []
    m.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach()))
    ids = torch.randint(0, 256, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    stats = RoutingStats()

    def forward():
        stats.observe(model(ids, attention_mask=torch.ones_like(mask), token_mask=mask, output_router=True), mask)

    model.train()
    forward()
    _, _, chosen = m.route(inputs[-1].reshape(-1, m.in_features))
    expected = torch.zeros(8)
    for n, real in enumerate(mask.reshape(-1).tolist()):
        if real:
            expected[chosen[n]] += 1
    counts = stats.counts[name]
    assert counts.dtype == torch.float32 and torch.equal(counts, expected)
    assert counts.sum() == 7 * 2
    assert m.balancing.tokens == 7  # the load-balancing pool counts the same tokens
    model.eval()
    forward()
    with torch.no_grad():
        model.train()
        forward()
    assert torch.equal(stats.counts[name], expected)  # neither eval nor no_grad forwards count
    assert len(inputs) == 3


def test_counts_not_doubled_by_activation_checkpoint_recomputation():
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-qwen3"))
    model.add_lora_moe(num_experts=4, top_k=2, rank=2, targets=("q_proj",))
    ids = torch.randint(0, 256, (2, 9))
    totals = []
    for flag in (False, True):
        stats = RoutingStats()
        model.gradient_checkpointing = flag
        out = model.train()(ids, labels=ids, output_router=True)
        out.loss.backward()
        stats.observe(out)
        totals.append(torch.stack([stats.counts[n] for n in model.lora_moe_modules()]))
    assert torch.equal(totals[0], totals[1]) and totals[0].sum() == 3 * 18 * 2


def test_load_balancing_loss_equals_hand_computation():
    m = _module(E=6, k=2).train()
    x = torch.randn(12, 16)
    mask = torch.ones(12)
    mask[[2, 7]] = 0
    m.token_mask = mask
    m(x)
    probs = torch.softmax(x @ m.router.weight.T, -1)
    idx = probs.topk(2, -1).indices
    real = mask.bool()
    f = torch.stack([(idx[real] == i).any(-1).float().mean() for i in range(6)])
    P = probs[real].mean(0)
    assert torch.allclose(m.aux_loss, 6 * (f * P).sum(), atol=1e-6)
    m.lb_enabled = False
    m(x)
    assert m.aux_loss is None


def test_model_sums_module_losses_and_reports_them_separately():
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-qwen3")).train()
    names = model.add_lora_moe(num_experts=4, top_k=2, rank=2, targets=("q_proj", "up_proj"))
    ids = torch.randint(0, 256, (2, 7))
    out = model(ids, labels=ids)
    mods = model.lora_moe_modules()
    assert len(names) == 6 and list(mods) == names
    assert torch.allclose(out.adapter_aux_loss, sum(m.aux_loss for m in mods.values()))
    assert out.adapter_aux_loss.requires_grad
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, plain)  # never added to the loss


def test_dmep_and_the_tools_weigh_the_pools_the_modules_produce():
    """One load-balancing path: each LoRA-MoE module pools its routing in its forward; ``adapter_aux_loss`` sums
    their losses, DMEP's term (``lb_loss``, what the benchmark, plan check and self-check add too) weighs the
    same pools by lb_coef, mean over the modules or their sum."""
    from minimoe.policies.dmep import DMEP, lb_loss

    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-qwen3")).train()
    model.add_lora_moe(num_experts=4, top_k=2, rank=2, targets=("q_proj", "up_proj"))
    ids = torch.randint(0, 256, (2, 7))
    mask = torch.ones(2, 7)
    mask[0, :3] = 0
    out = model(ids, labels=ids, token_mask=mask)
    mods = model.lora_moe_modules()
    assert [p is m.balancing for p, m in zip(out.adapter_balancing, mods.values(), strict=True)] == [True] * 6
    assert torch.equal(out.adapter_aux_loss, torch.stack([m.aux_loss for m in mods.values()]).sum())
    assert torch.equal(DMEP(DMEP.Config()).extra_loss(out, mask), lb_loss(out))  # training's term = the tools'
    assert torch.allclose(lb_loss(out), 0.01 * out.adapter_aux_loss / 6)  # the mean over the modules
    assert torch.allclose(lb_loss(out, DMEP.Config(lb_reduce="sum", lb_coef=0.5)), 0.5 * out.adapter_aux_loss)
    assert out.adapter_balancing[0].tokens == 11  # the forward's token mask: 14 tokens, 3 masked
    for m in mods.values():
        m.lb_enabled = False
    out = model(ids, labels=ids)
    assert out.adapter_balancing is None and out.adapter_aux_loss is None and lb_loss(out) is None
    assert model.eval()(ids).adapter_aux_loss is None


def test_pruning_unused_experts_keeps_outputs_identical():
    """With top-k weights renormalised over the chosen k, dropping experts that no token chose leaves
    every output unchanged: the ratios of the survivors' probabilities do not depend on the normaliser.
    k = 2, so the renormalised weights are not all 1 and a wrong normaliser changes the output."""
    m = _module(E=12, k=2)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = m(x)
        _, weights, chosen = m.route(x)
        used = set(chosen.reshape(-1).tolist())
        keep = sorted(used | {max(set(range(12)) - used)})  # the used ones plus one unused
        m.prune_experts(keep)
        after = m(x)
    assert weights.min() < 0.9  # both chosen experts carry weight
    assert len(keep) < 12 and m.num_experts == len(keep) and m.top_k == 2
    assert torch.allclose(before, after, atol=1e-6)
    assert m.expert_ids.tolist() == keep


def test_without_renormalisation_pruning_rescales_survivor_weights_by_the_lost_mass():
    m = _module(E=8, k=2, renormalize=False)
    x = torch.randn(6, 16)
    with torch.no_grad():
        base = x @ m.weight.T + m.bias
        delta_before = m(x) - base
        probs, _, chosen = m.route(x)
        keep = sorted(set(chosen.reshape(-1).tolist()))
        kept_mass = probs[:, keep].sum(-1, keepdim=True)
        m.prune_experts(keep)
        delta_after = m(x) - base
    assert torch.allclose(delta_after, delta_before / kept_mass, atol=1e-5)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_prune_slices_parameters_optimizer_state_and_clamps_top_k(kind):
    make, moments, scalar_bytes = OPTIMIZERS[kind]
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-qwen3")).train()
    model.add_lora_moe(num_experts=4, top_k=3, rank=2, targets=("q_proj", "o_proj"))
    opt = make(model.adapter_parameters())
    ids = torch.randint(0, 256, (2, 8))
    for _ in range(2):
        out = model(ids, labels=ids)
        (out.loss + 0.01 * out.adapter_aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    name = "layers.1.self_attn.q_proj"
    m = model.lora_moe_modules()[name]
    params = {"A": m.lora_A, "B": m.lora_B, "router": m.router.weight}
    values = {k: p.detach().clone() for k, p in params.items()}
    states = {k: {s: v.clone() for s, v in opt.state[p].items()} for k, p in params.items()}
    assert all(len(st) == moments + (scalar_bytes > 0) for st in states.values())
    params_before, state_before, bytes_before = model.num_adapter_parameters(), optim.state_numel(opt), \
        optim.state_bytes(opt)
    model.prune_lora_moe({name: [3, 1]}, optimizer=opt)
    removed = 2 * (2 * (m.in_features + m.out_features) + m.in_features)  # 2 experts: A, B, router row
    assert model.num_adapter_parameters() == params_before - removed
    assert sum(p.numel() for p in model.adapter_parameters()) == model.num_adapter_parameters()
    assert optim.state_numel(opt) == state_before - moments * removed
    assert bytes_before - optim.state_bytes(opt) == moments * removed * 4
    for k, p in {"A": m.lora_A, "B": m.lora_B, "router": m.router.weight}.items():
        assert torch.equal(p, values[k][[1, 3]]), k
        assert opt.state[p].keys() == states[k].keys()
        for s, v in states[k].items():  # kept experts' moments bit for bit, AdamW's step kept
            assert torch.equal(opt.state[p][s], v[[1, 3]] if v.shape == values[k].shape else v), (k, s)
    assert m.top_k == 2 and m.expert_ids.tolist() == [1, 3]
    model.prune_lora_moe({name: [0]}, optimizer=opt)
    assert m.top_k == 1 and m.expert_ids.tolist() == [1]
    for _ in range(2):  # still trains, nothing orphaned
        before = m.lora_B.detach().clone()
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert not torch.equal(m.lora_B, before)
    assert any(p is m.lora_B for g in opt.param_groups for p in g["params"])
    with pytest.raises(ValueError, match="keep must be non-empty indices in 0..0"):
        model.prune_lora_moe({name: [1]})
    with pytest.raises(ValueError, match=r"\['layers.0.mlp.gate'\] are not LoRA-MoE modules"):
        model.prune_lora_moe({"layers.0.mlp.gate": [0]})


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-olmoe"])
def test_model_passes_the_token_mask_to_lora_moe_counts(name):
    """The caller's token mask (e.g. response tokens only) decides what is counted, on dense and MoE bases."""
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset(name))
    model.add_lora_moe(num_experts=4, top_k=2, rank=2, targets=("q_proj",))
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    token_mask = torch.zeros(2, 8, dtype=torch.long)
    token_mask[:, 4:] = 1
    out = model.train()(ids, attention_mask=torch.ones_like(ids), token_mask=token_mask, output_router=True)
    stats = RoutingStats()
    stats.observe(out, token_mask)
    assert [r.unit for r in out.adapter_router] == list(model.lora_moe_modules())
    for name in model.lora_moe_modules():
        assert stats.counts[name].sum() == 2 * 4 * 2  # rows x masked-in tokens x top_k


def test_lora_moe_runs_on_a_bf16_base_without_autocast():
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-qwen3")).to(torch.bfloat16)
    model.add_lora_moe(num_experts=4, top_k=2, rank=2, targets=("q_proj",))
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    logits = model.eval()(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    stats = RoutingStats()
    stats.observe(model.train()(ids, output_router=True))
    assert all(stats.counts[n].dtype == torch.float32 for n in model.lora_moe_modules())


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-olmoe"])
def test_activation_checkpointing_keeps_the_token_mask_in_the_lb_gradient(name):
    """Recomputation in backward must see the same token mask as the forward did."""
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset(name))
    model.add_lora_moe(num_experts=4, top_k=2, rank=2, targets=("q_proj", "v_proj"))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    token_mask = torch.zeros(2, 9, dtype=torch.long)
    token_mask[:, 5:] = 1
    grads = []
    for flag in (False, True):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = flag
        out = model.train()(ids, labels=ids, token_mask=token_mask)
        (out.loss + 0.01 * out.adapter_aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7), n
