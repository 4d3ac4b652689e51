"""Policy decisions checked against what they logged and against hand computations, through the trainer:
EPnG's prune/grow sets and decay, the tokens statistics see, DMEP's pruning triggers, ESFT's scores,
activation checkpointing and a bf16 base."""

import dataclasses
import math

import pytest
import torch
from test_training import _lines, _run, train

import minimoe
from minimoe.data.dataset import Dataset
from minimoe.policies import Context, EPnG
from minimoe.model.tokenizer import byte_tokenizer
from minimoe.train.trainer import TrainConfig, Trainer


def test_epng_prunes_the_least_and_grows_the_most_important(tmp_path):
    rc, out = _run(tmp_path, "epng-order", "--policy", "epng", "--steps", "12", "--epng-warmup", "4",
                   "--epng-interval", "4", "--epng-alpha", "0.25", "--epng-beta", "0.25")
    assert rc == 0
    ranks = {"0": [8] * 8, "1": [8] * 8}
    for e in [e for e in _lines(out / "events.jsonl") if e["event"] == "prune_grow"]:
        imp = {(int(l), x): v for l, vs in e["importance"].items() for x, v in enumerate(vs)}
        alive = sorted(((int(l), x) for l, r in ranks.items() for x, v in enumerate(r) if v > 0),
                       key=lambda le: (imp[le], le))
        n = math.floor(0.25 * len(alive))
        assert [tuple(p) for p in e["pruned"]] == alive[:n]  # the n least important, in order
        top = set(alive[len(alive) - n:])  # the n most important (never pruned: n + n <= alive)
        assert {(l, x) for l, x, _ in e["grown"]} == top
        assert min(imp[le] for le in top) >= max(imp[tuple(p)] for p in e["pruned"])
        ranks = e["ranks"]


def test_epng_event_decays_the_statistics_by_lambda():
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-olmoe")).train()
    policy = EPnG(EPnG.Config(decay=0.3, warmup=1, interval=1))
    policy.setup(model, Context())
    opt = torch.optim.AdamW(policy.trainable_parameters(model), lr=1e-3)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    policy.stats.observe(model(ids, output_router=True), None)
    before = {l: (policy.stats.importance[l].clone(), policy.stats.counts[l].clone(), policy.stats.tokens[l])
              for l in policy.stats.importance}
    (event,) = policy.after_step(1, model, opt)
    for l, (imp, counts, tokens) in before.items():
        assert event["importance"][str(l)] == (imp / tokens).tolist()  # decided on the undecayed mean
        assert torch.equal(policy.stats.importance[l], imp * 0.3)
        assert torch.equal(policy.stats.counts[l], counts * 0.3)
        assert policy.stats.tokens[l] == tokens * 0.3


@pytest.mark.parametrize("stats_tokens", ["response", "all"])
def test_trainer_feeds_statistics_only_the_counted_tokens(tmp_path, stats_tokens):
    c = TrainConfig(policy="epng", model="tiny-olmoe", out=str(tmp_path / "m"), steps=2, batch_size=4, grad_accum=2,
                    stats_tokens=stats_tokens, eval_limit=0, policy_options={"warmup": 100})
    trainer = Trainer(c, show_progress=False).setup()
    drawn = []
    next_batch = trainer.data.next_batch
    trainer.data.next_batch = lambda n, part=(0, 1): drawn.append(next_batch(n, part)) or drawn[-1]
    trainer.train_step()
    trainer.train_step()
    masks = [b.loss_mask if stats_tokens == "response" else b.attention_mask for b in drawn]
    expected = float(sum(int(m.sum()) for m in masks))
    padded = float(sum(int(b.attention_mask.numel()) for b in drawn))
    assert expected < padded  # the batches do have padding (and prompts) to leave out
    for layer in trainer.model.config.moe_layers:
        assert trainer.policy.stats.tokens[layer] == expected
        assert trainer.policy.stats.counts[layer].sum() == expected * trainer.model.config.num_experts_per_tok


@pytest.mark.parametrize("score", ["token", "gate"])
def test_esft_scores_equal_a_hand_computation_from_the_routing(score):
    from minimoe.policies.esft import ESFT

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-olmoe", vocab_size=-(-tok.vocab_size // 16) * 16))
    pairs = [(f"q{i} " * (i + 1), f"answer {i}") for i in range(6)]
    data = Dataset.build(pairs, tok, 64, False, 0)
    policy = ESFT(ESFT.Config(score=score, sample_batches=2))
    scores = policy.score(model, Context(dataset=data, batch_size=3))
    data2 = Dataset.build(pairs, tok, 64, False, 0)
    first = Dataset.build(pairs, tok, 64, False, 0).next_batch(3).input_ids
    assert torch.equal(data.next_batch(3).input_ids, first)  # scoring left the data order where it was
    sums = {}
    with torch.no_grad():
        for _ in range(2):
            b = data2.next_batch(3)
            out = model.eval()(b.input_ids, attention_mask=b.attention_mask, output_router=True)
            real = b.attention_mask.reshape(-1).bool()  # --stats-tokens all (the default): every real token
            for route in out.router:
                s = torch.zeros(route.probs.shape[-1])
                for t in torch.nonzero(real).flatten().tolist():  # every top-k slot of a real token
                    for k in range(route.experts.shape[1]):
                        e = int(route.experts[t, k])
                        s[e] += float(route.weights[t, k]) if score == "gate" else 1.0
                sums[route.layer] = sums.get(route.layer, 0) + s
    per_expert = sum(sums.values())  # the official code's normalisation (the default): each expert over layers
    for layer, s in sums.items():
        assert torch.allclose(scores[layer], s / per_expert, atol=1e-6)
    assert torch.allclose(sum(scores.values()), torch.ones(len(per_expert)), atol=1e-6)
    assert policy.config.top_p == (0.1 if score == "gate" else 0.2)  # the ESFT paper's value per score


def test_gradient_checkpointing_through_train_py_trains_the_same(tmp_path):
    common = ["--policy", "dmep", "--steps", "4", "--dmep-prune-step", "3", "--dmep-log-interval", "1"]
    assert _run(tmp_path, "plain", *common)[0] == 0
    assert _run(tmp_path, "ckpt", *common, "--gradient-checkpointing")[0] == 0
    a, b = _lines(tmp_path / "plain/metrics.jsonl"), _lines(tmp_path / "ckpt/metrics.jsonl")
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=1e-5)
    ea = [e for e in _lines(tmp_path / "plain/events.jsonl") if e["event"] == "dmep_prune"]
    eb = [e for e in _lines(tmp_path / "ckpt/events.jsonl") if e["event"] == "dmep_prune"]
    assert ea[0]["counts"] == eb[0]["counts"] and ea[0]["survivors"] == eb[0]["survivors"]  # counted once


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["lora", "epng", "dmep"])
def test_bf16_base_trains_fp32_adapters(tmp_path, policy):
    extra = ["--epng-warmup", "2", "--epng-interval", "2"] if policy == "epng" else []
    c = train.resolve(["--policy", policy, "--model", "tiny-qwen3" if policy == "dmep" else "tiny-olmoe",
                       "--dtype", "bfloat16", "--steps", "4", "--batch-size", "4", "--eval-limit", "0",
                       "--out", str(tmp_path / policy), *extra])
    trainer = Trainer(c, show_progress=False).setup()
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert base and all(p.dtype == torch.bfloat16 for p in base.values())
    trainable = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    summary = trainer.train()
    assert math.isfinite(summary["final_loss"])
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if n in base)
    assert all(v.dtype == torch.float32 for st in trainer.optimizer.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim())


def test_bf16_refused_where_base_weights_train(tmp_path, capsys):
    rc, _ = _run(tmp_path, "f", "--policy", "full", "--dtype", "bfloat16", "--steps", "1")
    assert rc == 2 and "--dtype bfloat16 with --policy full" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_dmep_prunes_at_the_end_of_the_first_epoch_by_default_or_when_drift_settles(tmp_path):
    c = TrainConfig(policy="dmep", model="tiny-qwen3", out=str(tmp_path / "e"), steps=40, batch_size=16,
                    data="tiny-arith", policy_options={"log_interval": 2})
    trainer = Trainer(c, show_progress=False).setup()
    assert trainer.steps_per_epoch == 32  # 512 tiny-arith examples / 16
    assert trainer.policy.prune_step == 32
    # drift below the threshold at a logging step prunes then, not at the epoch's end
    c = TrainConfig(policy="dmep", model="tiny-qwen3", out=str(tmp_path / "d"), steps=12, batch_size=4,
                    policy_options={"log_interval": 2, "drift_threshold": 10.0, "prune_step": 100})
    trainer = Trainer(c, show_progress=False).setup()
    while trainer.step < c.steps and trainer.policy.pruned_at is None:
        trainer.train_step()
    # the first drift exists at the second measurement (step 4); 10 > any L1 distance (at most 2)
    assert trainer.policy.pruned_at == 4
    c = TrainConfig(policy="dmep", model="tiny-qwen3", out=str(tmp_path / "n"), steps=8, batch_size=4,
                    policy_options={"log_interval": 2, "drift_threshold": 1e-9, "prune_step": 100})
    trainer = Trainer(c, show_progress=False).setup()
    for _ in range(8):
        trainer.train_step()
    assert trainer.policy.pruned_at is None  # drift never that small: no pruning before prune_step


def test_dmep_lb_loss_is_that_of_the_whole_micro_batch_when_shared_over_processes():
    """DMEP's LB loss with several processes: each computes its share with the hard counts and token counts
    summed over all of them; the shares (and their gradients) add up to the loss of the whole micro-batch,
    which in one process is the modules' own ``out.adapter_aux_loss``."""
    from minimoe.policies import DMEP

    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-qwen3")).train()
    policy = DMEP(DMEP.Config(num_experts=4, top_k=2, rank=2, targets=("q_proj", "up_proj")))
    policy.setup(model, Context())
    ids = torch.randint(0, model.config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[0, :3], mask[3, 5:] = 0, 0
    routers = [m.router.weight for m in model.lora_moe_modules().values()]
    whole = model(ids, token_mask=mask, output_router=True)
    loss = policy.extra_loss(whole, mask)
    modules = len(model.lora_moe_modules())
    assert modules == 2 * model.config.num_hidden_layers
    # one process: the mean over the modules (the default), or DMEP's sum (lb_reduce="sum")
    assert torch.allclose(loss, 0.01 * whole.adapter_aux_loss / modules, rtol=0, atol=1e-7)
    summed_policy = DMEP(dataclasses.replace(policy.config, lb_reduce="sum"))
    assert torch.allclose(summed_policy.extra_loss(whole, mask), 0.01 * whole.adapter_aux_loss, rtol=0, atol=1e-7)
    halves = [(model(ids[i:i + 2], token_mask=mask[i:i + 2], output_router=True), mask[i:i + 2]) for i in (0, 2)]
    local = []
    policy.all_reduce = lambda t: local.append(t.clone()) or t
    for out, m in halves:
        policy.extra_loss(out, m)
    summed = local[0] + local[1]  # what all_reduce gives each of the two processes
    policy.all_reduce = lambda t: t.copy_(summed)
    shares = [policy.extra_loss(out, m) for out, m in halves]
    assert torch.allclose(shares[0] + shares[1], loss, rtol=0, atol=1e-6)
    for g_shared, g_whole in zip(torch.autograd.grad(shares[0] + shares[1], routers),
                                 torch.autograd.grad(loss, routers), strict=True):
        assert torch.allclose(g_shared, g_whole, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(shares[0], loss / 2, atol=1e-6)  # the halves really differ


def test_routing_units_are_read_by_kind_through_the_statistics_api():
    stats = minimoe.RoutingStats()
    probs = torch.softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), -1)
    experts = probs.topk(2, -1).indices
    for unit in (3, "layers.0.self_attn.q_proj", 1):
        stats.update(unit, probs, experts)
    assert stats.layers() == [1, 3] and stats.modules() == ["layers.0.self_attn.q_proj"]
    snap = stats.snapshot(stats.layers() + [7])  # a unit never seen is left out
    assert list(snap) == [1, 3] and snap[1].tokens == 5.0 and snap[1].counts.sum() == 10
    assert torch.allclose(stats.mean_importance(3), probs.mean(0)) and torch.equal(snap[3].mean_importance,
                                                                                    stats.mean_importance(3))
    assert stats.mean_importance(7).numel() == 0
