"""ResizableLoRAExpert and LoRALinear: exact counts, outputs across resizes, orthogonal growth, training."""

import math
import random

import pytest
import torch

import minimoe
from minimoe import optim
from minimoe.adapters.expert_lora import ResizableLoRAExpert
from minimoe.adapters.lora import kaiming_rows
from minimoe.model.moe import Groups, StackedLinear

AdamW = minimoe.AdamW

# every optimizer growth supports: factory, state tensors shaped like the parameter, bytes of step count per
# row (minimoe's AdamW counts steps per expert-LoRA row; SGD has no count). A stock torch AdamW that has
# stepped is refused when rows are inserted (test_a_stock_adamw_that_has_stepped_cannot_grow_rows).
OPTIMIZERS = {
    "adamw": (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1), 2, 4),
    "adamw-foreach": (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True), 2, 4),
    "adamw-fused": (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True), 2, 4),
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), 1, 0),
}


def _model(preset="tiny-olmoe", seed=0, **kw):
    torch.manual_seed(seed)
    model = minimoe.CausalLM(minimoe.preset(preset, **kw))
    return model


def _randomize_B(model, scale=0.05, seed=1):
    """LoRA B starts at zero; give it values so deltas are visible in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") or ".lora_B." in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def _ids(n=2, t=12, seed=3):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _expected_params(model):
    total = 0
    for mods in model.expert_lora_modules().values():
        for m in mods.values():
            total += int(m.ranks.sum()) * (m.in_features + m.out_features)
    return total


def _train_steps(model, opt, n=2, seed=0):
    model.train()
    for i in range(n):
        ids = _ids(seed=seed + i)
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_counts_exact_after_every_prune_and_grow():
    model = _model()
    model.add_expert_lora(rank=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj"))
    opt = AdamW(model.adapter_parameters(), lr=1e-3)
    H, I, E = 64, 32, 8
    assert model.num_adapter_parameters() == 2 * E * 4 * 3 * (H + I)
    _train_steps(model, opt)
    events = [("grow", {0: {1: 4, 3: 2}}), ("prune", {1: [0, 5, 7]}), ("grow", {1: {5: 3}}),
              ("prune", {0: [1]}), ("shrink", {0: {3: 1}}), ("grow", {0: {1: 8}})]
    for kind, plan in events:
        getattr(model, f"{kind}_expert_lora")(plan, optimizer=opt)
        _train_steps(model, opt, n=1)
        expected = _expected_params(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert model.num_adapter_parameters() == expected == trainable
        in_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
        assert in_opt == expected
        assert optim.state_numel(opt) == 2 * expected  # exp_avg + exp_avg_sq, nothing stale
    ranks = model.expert_lora_ranks()
    assert ranks[0].tolist() == [4, 8, 4, 5, 4, 4, 4, 4] and ranks[1].tolist() == [0, 4, 4, 4, 4, 3, 4, 0]


def test_output_unchanged_right_after_grow():
    model = _model("tiny-qwen3-moe")
    model.add_expert_lora(rank=4, alpha=8)
    _randomize_B(model)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        model.grow_expert_lora({0: {2: 4, 5: 8}, 1: {0: 2}}, generator=torch.Generator().manual_seed(0))
        after = model(ids).logits
    # new B rows are zero: the delta is unchanged up to fp32 summation order (the padded rank grew)
    assert (before - after).abs().max().item() < 1e-6


def test_prune_removes_exactly_the_pruned_experts_delta():
    torch.manual_seed(0)
    base = StackedLinear(6, 16, 24)
    torch.nn.init.normal_(base.weight)
    layer = ResizableLoRAExpert(base, rank=4, alpha=8, ranks=[4, 4, 2, 0, 4, 4])
    _randomize_B(layer)
    counts = torch.tensor([3, 2, 4, 1, 0, 5])
    x = torch.randn(int(counts.sum()), 16)
    groups = Groups.from_counts(counts)
    with torch.no_grad():
        before = layer(x, groups)
        removed = {e: layer.lora_delta(x, groups) for e in [1, 2]}
        layer.prune([1, 2])
        after = layer(x, groups)
    rows = torch.repeat_interleave(torch.arange(6), counts)
    diff = before - after
    assert torch.allclose(diff[rows == 1], removed[1][rows == 1], atol=1e-6)
    assert torch.allclose(diff[rows == 2], removed[2][rows == 2], atol=1e-6)
    assert torch.equal(diff[(rows != 1) & (rows != 2)], torch.zeros_like(diff[(rows != 1) & (rows != 2)]))


def test_prune_equals_a_model_built_with_the_pruned_layout():
    model = _model()
    model.add_expert_lora(rank=4, alpha=8)
    _randomize_B(model)
    model.prune_expert_lora({0: [1, 6], 1: [0]})
    ranks = model.expert_lora_ranks()

    direct = _model()  # same base weights (same seed), adapters built directly with the pruned layout
    for i in (0, 1):
        experts = direct.layers[i].mlp.experts
        for t in ("gate_proj", "up_proj"):
            setattr(experts, t, ResizableLoRAExpert(getattr(experts, t), 4, 8, ranks=ranks[i].tolist()))
    direct.load_state_dict(model.state_dict())
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)


def _snapshot(model, opt):
    """Parameters by name, optimizer state by parameter name (cloned), param-group layout, state bytes."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for n, p in model.named_parameters() if p in opt.state}
    return params, state, _group_names(model, opt), optim.state_bytes(opt)


def _group_names(model, opt):
    """Param groups as parameter names (a resize replaces the tensors: their names stay)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def _assert_restored(model, opt, snapshot):
    params, state, layout, nbytes = snapshot
    assert _group_names(model, opt) == layout
    assert optim.state_bytes(opt) == nbytes and len(opt.state) == len(state)
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, p in now.items():
        assert torch.equal(p, params[n]), n
        assert (n in state) == (p in opt.state), n
        for k, v in state.get(n, {}).items():
            assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_grow_then_shrink_round_trip_is_exact(kind):
    model = _model()
    model.add_expert_lora(rank=4, alpha=8)
    opt = OPTIMIZERS[kind][0](model.adapter_parameters())
    _train_steps(model, opt, n=3)
    snapshot = _snapshot(model, opt)
    model.grow_expert_lora({0: {2: 4, 3: 6}, 1: {7: 5}}, optimizer=opt)
    model.shrink_expert_lora({0: {2: 4, 3: 6}, 1: {7: 5}}, optimizer=opt)
    _assert_restored(model, opt, snapshot)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_grow_a_pruned_expert_then_prune_it_round_trip_is_exact(kind):
    """A pruned expert (rank 0) grows, its new rows take an optimizer step (and gain state), then it is
    pruned again: parameters, optimizer state (tensors and bytes) and outputs are what they were."""
    model = _model()
    model.add_expert_lora(rank=4, alpha=8)
    opt = OPTIMIZERS[kind][0](model.adapter_parameters())
    model.prune_expert_lora({1: [5]}, optimizer=opt)
    _train_steps(model, opt, n=3)
    ids = _ids()
    with torch.no_grad():
        logits = model(ids).logits
    snapshot = _snapshot(model, opt)
    model.grow_expert_lora({1: {5: 4}}, optimizer=opt, generator=torch.Generator().manual_seed(0))
    assert model.expert_lora_ranks()[1][5] == 4
    mods = model.expert_lora_modules()[1].values()
    assert all(m.lora_A.shape[0] == 7 * 4 + 4 for m in mods)  # expert 5's rows are back (gate_proj, up_proj)
    assert optim.state_bytes(opt) > snapshot[3]  # their moments (zero) and step counts (0) joined the state
    with torch.no_grad():
        for m in mods:
            m.lora_B_of(5).normal_()
        assert not torch.equal(model(ids).logits, logits)  # the grown expert changes the output
        for m in mods:
            m.lora_B_of(5).zero_()
    model.prune_expert_lora({1: [5]}, optimizer=opt)
    _assert_restored(model, opt, snapshot)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_partial_shrink_slices_rows_and_their_moments(kind):
    model = _model()
    model.add_expert_lora(rank=6, alpha=12, targets=("up_proj",))
    opt = OPTIMIZERS[kind][0](model.adapter_parameters())
    _train_steps(model, opt, n=2)
    layer = model.layers[0].mlp.experts.up_proj
    a, b = layer.lora_A, layer.lora_B  # (8 experts x 6 rows, 64), (32, 48); expert 3: rows 18..23
    a_state, b_state = {k: v.clone() for k, v in opt.state[a].items()}, {k: v.clone() for k, v in opt.state[b].items()}
    before = optim.state_bytes(opt)
    layer.shrink({3: 2}, optimizer=opt)
    a2, b2 = layer.lora_A, layer.lora_B
    keep = [i for i in range(48) if i not in (22, 23)]  # expert 3's two newest rows go
    assert a2.shape == (46, 64) and b2.shape == (32, 46) and layer.rank_of(3) == 4
    assert torch.equal(a2, a[keep]) and torch.equal(b2, b[:, keep])
    assert opt.state[a2].keys() == a_state.keys() and opt.state[b2].keys() == b_state.keys()
    for k, v in a_state.items():  # moments and per-row step counts sliced bit for bit
        assert torch.equal(opt.state[a2][k], v[keep]), k
    for k, v in b_state.items():
        assert torch.equal(opt.state[b2][k], v[:, keep] if v.dim() == 2 else v[keep]), k
    moments, step_bytes = OPTIMIZERS[kind][1:]
    assert before - optim.state_bytes(opt) == moments * 2 * (64 + 32) * 4 + 2 * 2 * step_bytes
    assert a not in opt.state and all(p is not a for g in opt.param_groups for p in g["params"])
    sliced = a2.detach().clone()
    _train_steps(model, opt, n=1)  # the sliced tensor keeps training (it is the one in the optimizer)
    assert layer.lora_A is a2 and not torch.equal(a2, sliced)


def test_new_rows_are_orthogonal_and_kaiming_scaled():
    torch.manual_seed(0)
    base = StackedLinear(2, 256, 64)
    layer = ResizableLoRAExpert(base, rank=8, alpha=16)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        layer.grow({0: 8}, generator=g)
    A = layer.lora_A_of(0)
    assert A.shape == (32, 256)
    g = torch.Generator().manual_seed(5)  # the same draws, before projection
    draws = [kaiming_rows(8, 256, g) for _ in range(3)]
    bound = 1 / math.sqrt(256)
    for c in range(1, 4):
        new, old, draw = A[8 * c: 8 * (c + 1)], A[: 8 * c], draws[c - 1]
        assert (new @ old.T).abs().max().item() < 1e-5  # orthogonal to every earlier row (fp32)
        # the draw is Kaiming-uniform U(-1/√in, 1/√in) ...
        assert draw.abs().max() <= bound and draw.abs().max() > 0.99 * bound
        # ... and each new row is that draw's component orthogonal to the old rows, rescaled to its norm
        q, _ = torch.linalg.qr(old.double().T)
        projected = draw.double() - (draw.double() @ q) @ q.T
        torch.testing.assert_close(new.norm(dim=1), draw.norm(dim=1), rtol=1e-6, atol=0)
        torch.testing.assert_close(new.double() / new.double().norm(dim=1, keepdim=True),
                                   projected / projected.norm(dim=1, keepdim=True), rtol=0, atol=1e-6)
    # Kaiming scale to sampling precision: E|row|² = in · bound²/3 = 1/3, sd of the mean of 24 rows ≈ 0.004
    assert abs(A[8:].norm(dim=1).pow(2).mean().item() - 1 / 3) < 0.012
    assert torch.equal(layer.lora_B_of(0), torch.zeros(64, 32))
    with pytest.raises(ValueError, match="min\\(in, out\\) = 64"):
        layer.grow({1: 60})


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_first_update_of_grown_rows_equals_a_fresh_parameters(kind):
    make = OPTIMIZERS[kind][0]
    model = _model()
    model.add_expert_lora(rank=4, alpha=8)
    opt = make(model.adapter_parameters())
    _train_steps(model, opt, n=4)  # the optimizer's old parameters are 4 steps in
    model.grow_expert_lora({0: {2: 4}}, optimizer=opt)
    layer = model.layers[0].mlp.experts.gate_proj
    new = {layer.lora_A: (0, slice(12, 16)), layer.lora_B: (1, slice(12, 16))}  # expert 2's rows 8..11 + 4 new
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) if p.requires_grad else None
    before = {p: p.detach().clone() for p in new}
    rows = {p: (lambda t, d=d, r=r: t[r] if d == 0 else t[:, r]) for p, (d, r) in new.items()}
    fresh = {p: torch.nn.Parameter(rows[p](p.detach()).clone()) for p in new}  # the new rows as new tensors
    for p in new:
        fresh[p].grad = rows[p](p.grad).clone()
    ref_opt = make(list(fresh.values()))
    opt.step()
    ref_opt.step()
    for p in new:
        update, ref_update = rows[p](p.detach() - before[p]), fresh[p].detach() - rows[p](before[p])
        assert ref_update.abs().max() > 0
        assert torch.allclose(update, ref_update, rtol=1e-6, atol=1e-9)
    if kind != "sgd-momentum":  # the new rows count 1 step, the others 5
        assert opt.state[layer.lora_A]["step"].tolist() == [5.0] * 12 + [1.0] * 4 + [5.0] * 20


def test_a_stock_adamw_that_has_stepped_cannot_grow_rows():
    """Its one step count per tensor would make inserted rows as old as the tensor: refused, nothing changed."""
    model = _model()
    model.add_expert_lora(rank=4, alpha=8)
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-2)
    _train_steps(model, opt, n=2)
    snapshot = _snapshot(model, opt)
    with pytest.raises(ValueError, match="counts 2 steps for all its rows.*minimoe.AdamW"):
        model.grow_expert_lora({0: {2: 4}, 1: {3: 4}}, optimizer=opt)
    _assert_restored(model, opt, snapshot)
    model.prune_expert_lora({0: [1]}, optimizer=opt)  # removing rows is fine with it
    model.shrink_expert_lora({1: {2: 1}}, optimizer=opt)
    assert model.expert_lora_ranks()[0][1] == 0 and model.expert_lora_ranks()[1][2] == 3


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_kept_moments_bit_identical_across_prune_and_grow(kind):
    make, moments, scalar_bytes = OPTIMIZERS[kind]
    model = _model()
    model.add_expert_lora(rank=4, alpha=8)
    opt = make(model.adapter_parameters())
    _train_steps(model, opt, n=2)
    layer = model.layers[1].mlp.experts.up_proj

    def expert_state(e):  # expert e's rows of every state tensor of lora_A
        start = sum(layer.ranks[:e].tolist())
        return {k: v[start:start + 4].clone() for k, v in opt.state[layer.lora_A].items()}

    kept = {e: expert_state(e) for e in (0, 4, 6)}
    assert all(len(st) == moments + (scalar_bytes > 0) for st in kept.values())
    before = optim.state_bytes(opt)
    model.prune_expert_lora({1: [1, 2, 3]}, optimizer=opt)
    freed = before - optim.state_bytes(opt)
    # 3 experts × 2 targets × 4 rows × ((in + out) × moments fp32 + a step count per row of A and of B)
    assert freed == 3 * 2 * 4 * ((64 + 32) * moments * 4 + 2 * scalar_bytes)
    model.grow_expert_lora({1: {0: 4}}, optimizer=opt)
    for e, st in kept.items():
        for k, v in expert_state(e).items():
            assert torch.equal(v, st[k])


def test_training_survives_random_prune_grow_events_and_every_parameter_moves():
    model = _model("tiny-qwen2-moe")
    model.add_expert_lora(rank=4, alpha=8)
    # no weight decay: a parameter whose gradient is always zero (an orphan in the graph) must not move
    opt = AdamW(model.adapter_parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    ids = _ids(4, 24, seed=9)
    model.train()
    first = model(ids, labels=ids).loss.item()
    for event in range(5):
        for _ in range(6):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        layer = rng.choice(model.config.moe_layers)
        ranks = model.expert_lora_ranks()[layer]
        if event % 2 == 0:
            live = [e for e in range(8) if ranks[e] > 0]
            model.prune_expert_lora({layer: rng.sample(live, 2)}, optimizer=opt)
        else:
            model.grow_expert_lora({layer: {rng.randrange(8): 4}}, optimizer=opt, generator=gen)
    snapshot = {id(p): p.detach().clone() for p in model.adapter_parameters()}
    got_gradient = {id(p): False for p in model.adapter_parameters()}
    for _ in range(6):
        model(ids, labels=ids).loss.backward()
        for p in model.adapter_parameters():
            assert p.grad is not None
            got_gradient[id(p)] |= bool(p.grad.abs().sum() > 0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    last = model(ids, labels=ids).loss.item()
    assert last < first - 0.2
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / (1 + 0.05 * 36))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == set(snapshot)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert id(p) in in_opt, f"{name} is orphaned from the optimizer"
            assert got_gradient[id(p)], f"{name} never received a gradient"
            assert not torch.equal(p.detach(), snapshot[id(p)]), f"{name} did not train"


@pytest.mark.parametrize("skip_pruned_fraction", [0.0, 2.0], ids=["skip-rank-0", "pack-rank-0"])
@pytest.mark.parametrize("preset", ["tiny-olmoe", "tiny-qwen3-moe"])
def test_grouped_and_loop_lora_paths_agree_with_heterogeneous_ranks(preset, skip_pruned_fraction, monkeypatch):
    monkeypatch.setattr(ResizableLoRAExpert, "skip_pruned_fraction", skip_pruned_fraction)
    model = _model(preset)
    model.add_expert_lora(rank=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj"))
    model.grow_expert_lora({0: {1: 12, 2: 3}})
    model.prune_expert_lora({0: [4, 5], 1: [0]})
    _randomize_B(model)
    ids = _ids(2, 20)
    results = []
    for impl in ("grouped_mm", "loop"):
        model.set_experts_implementation(impl)
        model.zero_grad()
        out = model.train()(ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), [p.grad.clone() for p in model.adapter_parameters()]))
    (la, ga), (lb, gb) = results
    assert (la - lb).abs().max() < 1e-5
    for a, b in zip(ga, gb):
        assert (a - b).abs().max() < 1e-5


def test_lora_linear_zero_B_is_the_base_and_training_never_touches_base():
    model = _model("tiny-qwen3")
    ids = _ids()
    with torch.no_grad():
        base_logits = model(ids).logits
    names = model.add_lora(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    assert len(names) == 9
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert "layers.0.self_attn.q_proj.weight" in frozen  # same key as the plain linear
    opt = AdamW(model.adapter_parameters(), lr=1e-2, weight_decay=0.1)
    _train_steps(model, opt, n=3)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, base_logits)
    assert model.num_adapter_parameters() == sum(p.numel() for p in model.adapter_parameters())


def test_targets_matching_nothing_list_what_exists():
    model = _model("tiny-qwen3")
    with pytest.raises(ValueError, match=r"match no dense linear.*available: \['down_proj', 'gate_proj', 'k_proj'"):
        model.add_lora(targets=("query",))
    with pytest.raises(ValueError, match="has no MoE layers"):
        model.add_expert_lora()
    moe = _model("tiny-olmoe")
    with pytest.raises(ValueError, match=r"not expert projections; choose from \['gate_proj', 'up_proj', 'down_proj'\]"):
        moe.add_expert_lora(targets=("w1",))
    moe.add_expert_lora(layers=[1])
    with pytest.raises(ValueError, match=r"layer 0 has no expert LoRA; layers with expert LoRA: \[1\]"):
        moe.prune_expert_lora({0: [1]})
    with pytest.raises(ValueError, match="out of range 0..7"):
        moe.prune_expert_lora({1: [8]})


def test_summary_shows_ranks_and_parameters():
    model = _model()
    model.add_expert_lora(rank=4, alpha=8)
    model.add_lora(rank=2, targets=("o_proj",))
    model.grow_expert_lora({1: {0: 4}})
    model.prune_expert_lora({1: [7]})
    text = model.adapter_summary()
    assert "1    7/8" in text and "8 4 4 4 4 4 4 0" in text
    assert "layers.1.self_attn.o_proj" in text
    assert f"adapter parameters: {model.num_adapter_parameters():,} trainable" in text
    assert math.isclose(model.num_adapter_parameters(), _expected_params(model) + 2 * 2 * (64 + 64))


def test_impossible_grow_or_shrink_changes_nothing():
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-olmoe"))
    model.add_expert_lora(rank=4, alpha=8, targets=("gate_proj", "up_proj"))
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-3)
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="expert 2 would reach rank 44"):
        model.grow_expert_lora({0: {1: 4}, 1: {2: 40}}, optimizer=opt)
    with pytest.raises(ValueError, match="cannot remove 5"):
        model.shrink_expert_lora({0: {1: 2}, 1: {3: 5}}, optimizer=opt)
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in after.values()}


def test_growth_after_pruning_every_expert_joins_the_expert_lora_group():
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-olmoe"))
    model.add_lora(rank=4, targets=("q_proj",))
    model.add_expert_lora(rank=4, alpha=8, targets=("gate_proj",))
    dense = [p for n, p in model.named_parameters() if p.requires_grad and "experts" not in n]
    experts = [p for n, p in model.named_parameters() if p.requires_grad and "experts" in n]
    opt = torch.optim.AdamW([{"params": dense, "lr": 1e-4}, {"params": experts, "lr": 1e-2}])
    model.prune_expert_lora({0: range(8)}, optimizer=opt)
    model.grow_expert_lora({0: {2: 4}}, optimizer=opt)  # layer 1's expert LoRA still tells the group
    new = [*model.expert_lora_modules()[0]["gate_proj"].adapter_parameters()]
    assert new and all(any(p is q for q in opt.param_groups[1]["params"]) for p in new)
    model.prune_expert_lora({0: [2], 1: range(8)}, optimizer=opt)
    model.grow_expert_lora({1: {2: 4}}, optimizer=opt)  # the empty factors kept their place in the group
    assert all(any(p is q for q in opt.param_groups[1]["params"])
               for p in model.expert_lora_modules()[1]["gate_proj"].adapter_parameters())
    other = torch.optim.AdamW([{"params": dense, "lr": 1e-4}, {"params": [torch.nn.Parameter(torch.zeros(1))]}])
    with pytest.raises(ValueError, match="param groups"):  # no expert LoRA in this optimizer: no guessing
        model.grow_expert_lora({0: {2: 4}}, optimizer=other)


def test_loop_and_grouped_paths_give_every_adapter_a_gradient():
    """An adapted expert that received no tokens gets a zero gradient on both paths (not None on one)."""
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-olmoe"))
    model.add_expert_lora(rank=4, alpha=8, targets=("gate_proj",))
    ids = torch.randint(0, model.config.vocab_size, (1, 1))  # one token: top-2 of 8 experts per layer
    grads = {}
    for impl in ("loop", "grouped_mm"):
        model.set_experts_implementation(impl)
        model.zero_grad(set_to_none=True)
        model.train()(ids).logits.sum().backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads["loop"].values()) and all(g is not None for g in grads["grouped_mm"].values())
    for n, g in grads["loop"].items():
        assert torch.allclose(g, grads["grouped_mm"][n], atol=1e-6), n


def test_an_empty_layout_after_a_forward_leaves_the_base():
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-olmoe"))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        base = model.eval()(ids).logits
    model.add_expert_lora(rank=4, alpha=8)
    for m in model.expert_lora_modules()[0].values():
        torch.nn.init.normal_(m.lora_B_of(0))
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, base)
        for layer in model.expert_lora_modules().values():
            for m in layer.values():
                m.set_ranks([0] * m.num_experts)  # the cached packing must go too
        assert torch.equal(model(ids).logits, base)
        # the delta itself (forward skips it when no chunk is left): a stale cached plan would still
        # list adapted experts and fail to pack them
        m = model.expert_lora_modules()[0]["gate_proj"]
        groups = Groups.from_counts(torch.full((m.num_experts,), 2), "grouped_mm")
        x = torch.randn(2 * m.num_experts, m.in_features)
        assert torch.equal(m.lora_delta(x, groups), torch.zeros(x.shape[0], m.out_features))
