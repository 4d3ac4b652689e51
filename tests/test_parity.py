"""minimoe against transformers on the same weights: logits, loss, aux loss, generation."""

import json
import shutil

import pytest
import torch
from conftest import VARIANTS, save_fused

import minimoe

LOGIT_TOL = 1e-4
LOSS_TOL = 1e-5


def _ids(vocab: int, shape=(2, 16), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _compare(hf, ours, ids, attention_mask=None, position_ids=None):
    labels = ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
        labels[:, 1:][attention_mask[:, :-1] == 0] = -100  # a padding position's prediction is noise
    kw = dict(attention_mask=attention_mask, position_ids=position_ids)
    with torch.no_grad():
        ref = hf(ids, labels=labels, **kw)  # loss = cross-entropy only (no router logits requested)
        out = ours(ids, labels=labels, **kw)
    real = slice(None) if attention_mask is None else attention_mask.bool()
    assert (ref.logits[real] - out.logits[real]).abs().max().item() < LOGIT_TOL
    assert abs(ref.loss.item() - out.loss.item()) < LOSS_TOL
    if hf.config.model_type != "qwen3":
        with torch.no_grad():
            ref_aux = hf(ids, labels=labels, output_router_logits=True, **kw)
        assert abs(ref_aux.aux_loss.item() - out.aux_loss.item()) < LOSS_TOL
        # transformers adds coef * aux to its loss when router logits are requested; we never do
        total = out.loss + hf.config.router_aux_loss_coef * out.aux_loss
        assert abs(ref_aux.loss.item() - total.item()) < LOSS_TOL
    else:
        assert out.aux_loss is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_loss_aux_match_transformers(hf_checkpoint, variant):
    hf, directory = hf_checkpoint(variant)
    ours = minimoe.from_pretrained(directory)
    assert ours.config.model_type == hf.config.model_type
    _compare(hf, ours, _ids(hf.config.vocab_size))


@pytest.mark.parametrize("variant", ["olmoe", "qwen2_moe-sparse", "qwen3-tied", "qwen3_moe"])
def test_padded_batch_matches_transformers(hf_checkpoint, variant):
    """Left padding with an attention mask: real positions, loss and masked aux loss all match."""
    hf, directory = hf_checkpoint(variant)
    ours = minimoe.from_pretrained(directory)
    ids = _ids(hf.config.vocab_size, (3, 14), seed=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    _compare(hf, ours, ids, attention_mask=mask, position_ids=positions)


@pytest.mark.parametrize("variant", ["olmoe", "qwen2_moe", "qwen2_moe-sparse", "qwen3_moe"])
def test_fused_expert_file_loads_the_same(hf_checkpoint, variant, tmp_path):
    hf, _ = hf_checkpoint(variant)
    ours = minimoe.from_pretrained(save_fused(hf, tmp_path / "fused"))
    _compare(hf, ours, _ids(hf.config.vocab_size, seed=3))


def test_sharded_checkpoint_loads(hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint("qwen2_moe")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    _compare(hf, minimoe.from_pretrained(tmp_path), _ids(hf.config.vocab_size, seed=4))


def test_tied_head_is_the_embedding(hf_checkpoint):
    _, tied_dir = hf_checkpoint("qwen3-tied")
    _, untied_dir = hf_checkpoint("qwen3-untied")
    tied, untied = minimoe.from_pretrained(tied_dir), minimoe.from_pretrained(untied_dir)
    assert tied.tied and tied.lm_head.weight is tied.embed_tokens.weight
    assert not untied.tied
    assert not torch.equal(untied.lm_head.weight, untied.embed_tokens.weight)


def test_tied_config_with_separate_lm_head_uses_it(hf_checkpoint, tmp_path):
    """Like Qwen3-0.6B: tie_word_embeddings=true but the file has its own lm_head.weight."""
    from safetensors.torch import load_file, save_file

    hf, directory = hf_checkpoint("qwen3-tied")
    state = load_file(str(directory / "model.safetensors"))
    head = 0.1 * torch.randn(state["model.embed_tokens.weight"].shape)
    state["lm_head.weight"] = head
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    ours = minimoe.from_pretrained(tmp_path)
    assert not ours.tied and torch.equal(ours.lm_head.weight, head)


@pytest.mark.parametrize("variant", ["olmoe", "qwen2_moe", "qwen3_moe"])
def test_grouped_path_equals_loop_path(hf_checkpoint, variant):
    """The grouped_mm fast path and the per-expert loop agree in the forward and in every gradient."""
    _, directory = hf_checkpoint(variant)
    ids = _ids(128, (2, 24), seed=5)
    results = {}
    for impl in ("grouped_mm", "loop"):
        model = minimoe.from_pretrained(directory).train()
        model.set_experts_implementation(impl)
        out = model(ids, labels=ids)
        (out.loss + 0.01 * out.aux_loss).backward()
        results[impl] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    (la, ga), (lb, gb) = results["grouped_mm"], results["loop"]
    assert (la - lb).abs().max().item() < 1e-5
    for name in ga:
        assert ga[name] is not None, name
        assert (ga[name] - gb[name]).abs().max().item() < 1e-5, name


def test_grouped_mm_handles_experts_with_no_tokens():
    from minimoe.model.moe import Groups, grouped_linear

    w = torch.randn(5, 8, 16)
    counts = torch.tensor([3, 0, 4, 0, 2])
    x = torch.randn(int(counts.sum()), 16)
    a = grouped_linear(x, w, Groups.from_counts(counts, "grouped_mm"))
    b = grouped_linear(x, w, Groups.from_counts(counts, "loop"))
    ref = torch.cat([x[:3] @ w[0].T, x[3:7] @ w[2].T, x[7:] @ w[4].T])
    assert torch.allclose(a, ref, atol=1e-6) and torch.allclose(b, ref, atol=1e-6)


def test_router_output_is_full_fp32_softmax(hf_checkpoint):
    hf, directory = hf_checkpoint("qwen3_moe")
    ours = minimoe.from_pretrained(directory)
    ids = _ids(128, (2, 10), seed=6)
    with torch.no_grad():
        out = ours(ids, output_router=True)
        ref = hf(ids, output_router_logits=True)
    assert [r.layer for r in out.router] == ours.config.moe_layers
    for route, ref_logits in zip(out.router, ref.router_logits):
        assert route.probs.dtype == torch.float32 and route.probs.shape == (20, 8)
        assert torch.allclose(route.probs.sum(-1), torch.ones(20))
        assert torch.allclose(route.probs, torch.softmax(ref_logits.float(), -1), atol=1e-5)
        assert torch.equal(route.experts, route.probs.topk(3).indices)
        # Qwen3-MoE renormalises the chosen weights
        assert torch.allclose(route.weights.sum(-1), torch.ones(20), atol=1e-6)


@pytest.mark.parametrize("variant", ["olmoe", "qwen2_moe", "qwen3-tied", "qwen3_moe"])
def test_greedy_generation_matches_transformers(hf_checkpoint, variant):
    hf, directory = hf_checkpoint(variant)
    ours = minimoe.from_pretrained(directory)
    prompt = _ids(128, (1, 7), seed=7)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=20, eos_token_id=[])
    assert got.shape == (1, 27)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("variant", ["olmoe", "qwen3_moe"])
def test_left_padded_batch_generates_like_each_prompt_alone(hf_checkpoint, variant):
    _, directory = hf_checkpoint(variant)
    ours = minimoe.from_pretrained(directory)
    prompts = [_ids(128, (1, n), seed=10 + n)[0] for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batch = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = ours.generate(p[None], max_new_tokens=12, eos_token_id=[])
        assert torch.equal(batch[i, width:], alone[0, len(p):])


def test_generation_stops_at_any_eos_and_pads(hf_checkpoint):
    _, directory = hf_checkpoint("olmoe")
    ours = minimoe.from_pretrained(directory)
    prompt = _ids(128, (2, 5), seed=20)
    free = ours.generate(prompt, max_new_tokens=10, eos_token_id=[])
    stop = [int(free[0, 7]), int(free[1, 6])]  # tokens each row emits early
    out = ours.generate(prompt, max_new_tokens=10, eos_token_id=stop, pad_token_id=127)
    for row in range(2):
        gen = out[row, 5:].tolist()
        first = min(i for i, t in enumerate(gen) if t in stop)
        assert torch.equal(out[row, : 5 + first + 1], free[row, : 5 + first + 1])
        assert all(t == 127 for t in gen[first + 1:])


def test_sampling_is_seeded_and_top_p_restricts_support():
    from minimoe.model.generate import sample_next

    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).repeat(500, 1)
    a = sample_next(logits, True, 1.0, 0.9, generator=torch.Generator().manual_seed(0))
    b = sample_next(logits, True, 1.0, 0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # p = softmax = [.72, .26, .01, .004]: top_p=0.9 keeps {0, 1} (the token crossing 0.9 included)
    assert set(a.tolist()) == {0, 1}
    greedy = sample_next(logits[:1], False)
    assert greedy.item() == 0


def test_top_p_keeps_what_transformers_keeps_at_the_boundary():
    from transformers.generation.logits_process import TopPLogitsWarper

    from minimoe.model.generate import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]])).repeat(2000, 1)
    for top_p in (0.5, 0.75, 0.9, 1e-9):  # boundaries where the cumulative mass equals top_p exactly
        kept = torch.isfinite(TopPLogitsWarper(top_p)(None, logits[:1].clone()))[0].nonzero().flatten().tolist()
        drawn = sample_next(logits, True, 1.0, top_p, generator=torch.Generator().manual_seed(0))
        assert sorted(set(drawn.tolist())) == kept, top_p


def test_generate_stops_on_generation_config_eos_by_default(hf_checkpoint, tmp_path):
    hf, directory = hf_checkpoint("qwen3-untied")
    ids = torch.tensor([[5, 6, 7]])
    first = hf.generate(ids, max_new_tokens=1, do_sample=False)[0, -1].item()
    local = tmp_path / "m"
    shutil.copytree(directory, local)
    gen = json.loads((local / "generation_config.json").read_text()) if (local / "generation_config.json").exists() else {}
    (local / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [first, 99]}))
    model = minimoe.from_pretrained(local)
    assert model.config.eos_token_id == (first, 99)
    assert model.generate(ids, max_new_tokens=5)[0].tolist() == [5, 6, 7, first]  # stops on it, as transformers
