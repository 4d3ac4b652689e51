"""The adapter protocol: every kind rebuilds itself from its spec, loads its own file tensors, merges,
initialises on request (meta-device builds), and resizes all-or-nothing."""

import json

import pytest
import torch
from torch import nn

import minimoe
from minimoe.adapters.base import KINDS, Adapter, adapters_of, base_state_dict

ATTACH = {  # kind -> (preset, attach the adapter with generator g)
    "expert_lora": ("tiny-olmoe", lambda m, g: m.add_expert_lora(rank=4, alpha=8, generator=g)),
    "lora": ("tiny-olmoe", lambda m, g: m.add_lora(rank=4, alpha=8, targets=("q_proj", "v_proj"), generator=g)),
    "lora_moe": ("tiny-qwen3", lambda m, g: m.add_lora_moe(num_experts=4, top_k=2, rank=2, targets=("q_proj", "up_proj"),
                                                           generator=g)),
    "esft": ("tiny-olmoe", lambda m, g: _select(m)),
    "trained_linear": ("tiny-qwen2-moe", lambda m, g: _train_shared(m)),
}


def _train_shared(model):
    for layer in model.layers:
        layer.mlp.shared_expert.up_proj = minimoe.adapters.trained.TrainedLinear(layer.mlp.shared_expert.up_proj)
    model._freeze_base()


def _select(model):
    for i in model.config.moe_layers:
        block = model.layers[i].mlp.experts
        block.up_proj = minimoe.SelectedExperts(block.up_proj, [1, 3])
    model._freeze_base()


def _build(kind, device=None):
    preset, attach = ATTACH[kind]
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = minimoe.CausalLM(minimoe.preset(preset))
    attach(model, torch.Generator().manual_seed(7))
    return model


@pytest.mark.parametrize("kind", list(ATTACH))
def test_a_meta_build_initialised_on_request_equals_the_eager_build(kind):
    eager = _build(kind)
    meta = _build(kind, "meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.load_state_dict(base_state_dict(eager), strict=False)  # the base checkpoint
    meta.reset_adapter_parameters(torch.Generator().manual_seed(7))
    assert meta.state_dict().keys() == eager.state_dict().keys()
    for k, v in eager.state_dict().items():
        assert torch.equal(meta.state_dict()[k], v), k
    assert [n for n, p in meta.named_parameters() if p.requires_grad] == \
        [n for n, p in eager.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", list(ATTACH))
def test_each_kind_rebuilds_from_its_spec_and_loads_its_tensors(kind):
    model = _build(kind)
    adapters = adapters_of(model)
    assert adapters and {m.kind for m in adapters.values()} == {kind} and type(next(iter(adapters.values()))) is KINDS[kind]
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    want = model.eval()(ids).logits
    for name, m in adapters.items():
        assert not isinstance(m, nn.Linear) and not hasattr(m, "reset_parameters")  # nothing re-inits the base
        base = m.base_module()
        assert type(base) is m.base_type and base.weight is m.weight
        rebuilt = type(m).from_spec(base, json.loads(json.dumps(m.spec())))  # a spec survives JSON
        shapes = type(m).expected_shapes(base, m.spec())
        tensors = m.adapter_tensors()
        assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
        rebuilt.load_adapter_tensors({k: v.detach().clone() for k, v in tensors.items()})
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, rebuilt)
    assert torch.equal(model.eval()(ids).logits, want)


@pytest.mark.parametrize("kind", ["expert_lora", "lora", "esft", "trained_linear"])
def test_merged_weight_folds_the_adapter_into_the_base(kind):
    model = _build(kind)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.2)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    merged = minimoe.CausalLM(model.config)
    state = base_state_dict(model)
    state.update({f"{n}.weight": m.merged_weight() for n, m in adapters_of(model).items()})
    merged.load_state_dict(state)
    assert torch.allclose(merged.eval()(ids).logits, model.eval()(ids).logits, atol=1e-5)


def test_a_lora_moe_says_it_cannot_merge():
    m = next(iter(adapters_of(_build("lora_moe")).values()))
    assert not m.mergeable
    with pytest.raises(minimoe.AdapterError, match="cannot be merged"):
        m.merged_weight()


def test_prune_checks_the_whole_plan_before_changing_anything():
    model = _build("expert_lora")
    ranks = {l: r.clone() for l, r in model.expert_lora_ranks().items()}
    with pytest.raises(ValueError, match=r"expert indices \[99\] out of range"):
        model.prune_expert_lora({0: [1, 2], 1: [99]})
    assert all(torch.equal(model.expert_lora_ranks()[l], r) for l, r in ranks.items())  # layer 0 untouched

    dense = _build("lora_moe")
    names = list(dense.lora_moe_modules())
    with pytest.raises(ValueError, match="keep must be non-empty indices"):
        dense.prune_lora_moe({names[0]: [0, 1], names[1]: []})
    assert all(m.num_experts == 4 for m in dense.lora_moe_modules().values())


def test_an_edited_alpha_is_refused_not_applied(tmp_path):
    model = _build("lora")
    path = minimoe.save_adapter(model, tmp_path / "a")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["lora"]["layers.0.self_attn.q_proj"]["alpha"] = 32
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    base = minimoe.CausalLM(minimoe.preset("tiny-olmoe"))
    with pytest.raises(minimoe.AdapterError, match=r"scaling 2.0 is not alpha / rank = 32 / 4"):
        base.load_adapter(path, check_base=False)
    assert not adapters_of(base)


def test_every_kind_is_registered():
    assert set(KINDS) == {"expert_lora", "lora", "lora_moe", "esft", "trained_linear"}
    assert all(issubclass(cls, Adapter) for cls in KINDS.values())
