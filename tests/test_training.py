"""train.py and the policies: EPnG, DMEP and ESFT decisions against hand computations, exact resume,
honest logs, and every bad input named."""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minimoe
from minimoe import optim
from minimoe.data.dataset import Dataset, encode_pair, read_pairs
from minimoe.policies import DMEP, Context, EPnG
from minimoe.policies.esft import SelectedExperts, normalize_scores, top_p_selection
from minimoe.policies.stats import drift, gini, normalized_entropy
from minimoe.model.tokenizer import byte_tokenizer
from minimoe.train.trainer import TrainConfig, Trainer, TrainingError

from minimoe.cli import train as train  # noqa: E402


def _run(tmp_path, name, *args):
    """train.py on a tiny random preset (pinned, so the shipped model's scaled defaults don't apply)."""
    out = tmp_path / name
    extra = [] if "--model" in args else ["--model", "tiny-qwen3" if "dmep" in args else "tiny-olmoe"]
    rc = train.main(["--out", str(out), "--batch-size", "4", "--eval-limit", "0", *extra, *args])
    return rc, out


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- EPnG ---------------------------------------------------------------------------------------
def test_epng_events_fraction_budget_and_ledger(tmp_path, capsys):
    rc, out = _run(tmp_path, "epng", "--policy", "epng", "--steps", "18", "--epng-warmup", "6",
                   "--epng-interval", "4", "--epng-alpha", "0.25", "--epng-beta", "0.25")
    assert rc == 0
    events = [e for e in _lines(out / "events.jsonl") if e["event"] == "prune_grow"]
    assert [e["step"] for e in events] == [8, 12, 16]  # step >= T_w and step % T_p == 0
    alive = 16  # 2 layers x 8 experts
    budget = 2 * 8 * 8 * 2 * (64 + 32)  # layers x experts x rank x targets x (in + out)
    ranks = {"0": [8] * 8, "1": [8] * 8}  # before the first event
    per_rank = 2 * (64 + 32)  # gate + up, each (in + out)
    for e in events:
        assert len(e["pruned"]) == math.floor(0.25 * alive)
        assert e["budget"] == budget and e["params_after"] <= budget
        freed = sum(ranks[str(l)][x] for l, x in e["pruned"]) * per_rank
        assert e["params_after_prune"] == e["params_before"] - freed  # the ledger is exact
        assert e["params_after"] == e["params_after_prune"] + sum(d for _, _, d in e["grown"]) * per_rank
        assert e["unspent"] == budget - e["params_after"] and e["unspent"] < per_rank * len(e["grown"] or [1])
        assert not {(l, x) for l, x in e["pruned"]} & {(l, x) for l, x, _ in e["grown"]}
        expected = {k: list(v) for k, v in ranks.items()}
        for l, x in e["pruned"]:
            expected[str(l)][x] = 0
        for l, x, d in e["grown"]:
            expected[str(l)][x] += d
        assert e["ranks"] == expected
        ranks = e["ranks"]
        alive -= len(e["pruned"])
        assert e["experts_with_adapter"] == alive
    metrics = _lines(out / "metrics.jsonl")
    assert len(metrics) == 18 and max(m["trainable"] for m in metrics) == budget
    said = capsys.readouterr().out  # each event is told on the console, and the final ranks shown
    e = events[0]
    assert (f"step 8: pruned {len(e['pruned'])} expert adapters, grew {len(e['grown'])} experts by "
            f"{sum(d for _, _, d in e['grown'])} ranks; {e['experts_with_adapter']} experts keep an adapter; "
            f"parameters {e['params_after']:,} of budget {budget:,}") in said
    final = " ".join(str(r) for r in events[-1]["ranks"]["0"])
    assert "after training:" in said and final in said.split("after training:")[1]


def test_epng_importance_is_the_mean_full_softmax_and_decays():
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-olmoe")).train()
    policy = EPnG(EPnG.Config(decay=0.5))
    policy.setup(model, Context())
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    out = model(ids, output_router=True)
    policy.stats.observe(out, mask)
    real = mask.reshape(-1).bool()
    for route in out.router:
        expected = torch.softmax(route.logits.float(), -1)[real].mean(0)  # over all experts, real tokens
        assert torch.allclose(policy.stats.mean_importance(route.layer), expected, atol=1e-6)
    first = {r.layer: torch.softmax(r.logits.float(), -1)[real].sum(0) for r in out.router}
    policy.stats.decay(0.5)
    ids2 = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    out2 = model(ids2, output_router=True)
    policy.stats.observe(out2, None)
    for route in out2.router:
        second = torch.softmax(route.logits.float(), -1).sum(0)
        expected = (0.5 * first[route.layer] + second) / (0.5 * 16 + 20)
        assert torch.allclose(policy.stats.mean_importance(route.layer), expected, atol=1e-6)


# --- DMEP ---------------------------------------------------------------------------------------
def test_dmep_lb_loss_survivors_and_exact_counts(tmp_path):
    c = TrainConfig(policy="dmep", model="tiny-qwen3", out=str(tmp_path / "d"), steps=8, batch_size=4,
                    policy_options={"prune_step": 5, "log_interval": 2, "tau": 0.12})
    trainer = Trainer(c, show_progress=False).setup()
    seen = []
    original = trainer.policy.extra_loss
    trainer.policy.extra_loss = lambda out, mask: seen.append((trainer.step, out.adapter_aux_loss)) or original(out, mask)
    params_before = opt_before = None
    while trainer.step < c.steps:
        if trainer.step == 4:
            params_before = trainer.model.num_adapter_parameters()
            opt_before = optim.state_numel(trainer.optimizer)
        trainer.train_step()
    assert all(aux is not None and aux > 0 for step, aux in seen if step < 5)
    assert all(aux is None for step, aux in seen if step >= 5)  # LB loss off after pruning
    removed = 0
    for name, m in trainer.model.lora_moe_modules().items():
        assert m.num_experts >= 2 and m.top_k <= m.num_experts and not m.lb_enabled
        removed += (8 - m.num_experts) * (m.rank * (m.in_features + m.out_features) + m.in_features)
    assert trainer.model.num_adapter_parameters() == params_before - removed
    assert optim.state_numel(trainer.optimizer) == opt_before - 2 * removed
    prune = [e for e in _lines(Path(c.out) / "events.jsonl") if e["event"] == "dmep_prune"][0]
    assert prune["step"] == 5 and prune["params_after"] == params_before - removed
    # the survivors follow τ = 0.12 and k_min = 2 on the hard counts the event decided on
    assert prune["survivors"].keys() == prune["counts"].keys()
    for name, kept in prune["survivors"].items():
        counts = torch.tensor(prune["counts"][name], dtype=torch.float64)
        u = counts / counts.sum()
        above = [i for i in range(8) if u[i] >= 0.12]
        expected = above if len(above) >= 2 else sorted(sorted(range(8), key=lambda i: (-float(u[i]), i))[:2])
        assert kept == expected and (name in prune["clamped"]) == (len(above) < 2)
        assert counts.sum() > 0


def test_dmep_survivor_rule_and_clamping(capsys):
    policy = DMEP(DMEP.Config(tau=0.2, k_min=2))
    keep, clamped = policy.survivors(torch.tensor([50.0, 30.0, 10.0, 5.0, 5.0]), top_k=2)
    assert keep == [0, 1] and not clamped  # u = .5 .3 .1 .05 .05
    keep, clamped = policy.survivors(torch.tensor([90.0, 4.0, 3.0, 3.0]), top_k=2)
    assert keep == [0, 1] and clamped  # only expert 0 passes τ: topped up with the next most used
    keep, clamped = DMEP(DMEP.Config(tau=0.2, k_min=3)).survivors(torch.tensor([50.0, 30.0, 15.0, 5.0]), 2)
    assert keep == [0, 1, 2] and clamped


def test_dmep_clamping_is_said(tmp_path, capsys):
    rc, out = _run(tmp_path, "dmep", "--policy", "dmep", "--steps", "3", "--dmep-prune-step", "2",
                   "--dmep-tau", "0.9", "--dmep-targets", "q_proj")
    assert rc == 0
    said = capsys.readouterr().out
    assert "dmep: tau=0.9 would leave fewer than max(k_min=2, top_k) experts in 3 module(s)" in said
    prune = [e for e in _lines(out / "events.jsonl") if e["event"] == "dmep_prune"][0]
    assert len(prune["clamped"]) == 3 and all(len(v) == 2 for v in prune["survivors"].values())
    assert (f"step 2: pruned LoRA-MoE experts: 6 of 24 survive in 3 modules (per module 2-2); adapter parameters "
            f"{prune['params_before']:,} -> {prune['params_after']:,}; load-balancing loss off") in said


def test_routing_metrics_match_hand_computations():
    counts = torch.tensor([4.0, 0.0, 2.0, 2.0])
    x = counts.tolist()
    hand_gini = sum(abs(a - b) for a in x for b in x) / (2 * 4 * sum(x))
    assert gini(counts) == pytest.approx(hand_gini) and gini(torch.ones(5)) == 0
    u = [v / 8 for v in x if v]
    assert normalized_entropy(counts) == pytest.approx(-sum(p * math.log(p) for p in u) / math.log(4))
    assert normalized_entropy(torch.ones(6)) == pytest.approx(1.0)
    assert drift(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0])) == pytest.approx(0.5)


def test_dmep_logged_metrics_are_the_interval_counts(tmp_path):
    c = TrainConfig(policy="dmep", model="tiny-qwen3", out=str(tmp_path / "d"), steps=4, batch_size=2,
                    policy_options={"prune_step": 100, "log_interval": 2, "targets": ("v_proj",)})
    trainer = Trainer(c, show_progress=False).setup()
    trainer.train_step()
    trainer.train_step()
    name = "layers.0.self_attn.v_proj"
    first = trainer.stats.counts[name].clone()
    trainer.train_step()
    trainer.train_step()
    second = trainer.stats.counts[name] - first
    logs = [e for e in _lines(Path(c.out) / "events.jsonl") if e["event"] == "routing"]
    got = logs[1]["modules"]["layers.0.self_attn.v_proj"]
    assert got["gini"] == pytest.approx(gini(second)) and got["entropy"] == pytest.approx(normalized_entropy(second))
    assert got["drift"] == pytest.approx(drift(first, second))


# --- ESFT ---------------------------------------------------------------------------------------
def test_esft_top_p_selection_by_hand():
    scores = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])
    assert top_p_selection(scores, 0.5) == [1, 3]  # 0.40 then 0.70 crosses 0.5: included
    assert top_p_selection(scores, 0.4) == [1]
    assert top_p_selection(scores, 0.71) == [1, 3, 4]


def test_esft_score_normalisations_by_hand():
    sums = {0: torch.tensor([6.0, 2.0, 0.0]), 1: torch.tensor([2.0, 2.0, 4.0])}
    layer = normalize_scores(sums, "layer")
    assert layer[0].tolist() == [0.75, 0.25, 0.0] and layer[1].tolist() == [0.25, 0.25, 0.5]
    glob = normalize_scores(sums, "global")  # the reference code: each expert over the layers
    assert glob[0].tolist() == [0.75, 0.5, 0.0] and glob[1].tolist() == [0.25, 0.5, 1.0]


def test_esft_trains_only_selected_experts(tmp_path):
    c = TrainConfig(policy="esft", out=str(tmp_path / "e"), steps=3, batch_size=4, lr=1e-2,
                    policy_options={"sample_batches": 2, "top_p": 0.3})
    trainer = Trainer(c, show_progress=False).setup()
    policy = trainer.policy
    for layer, scores in policy.scores.items():
        assert policy.selection[layer] == top_p_selection(torch.tensor(scores), 0.3)
    # normalised as the official code does: each expert's scores sum to 1 over the layers
    assert [sum(s[e] for s in policy.scores.values()) for e in range(8)] == pytest.approx([1.0] * 8)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in policy.trainable_parameters(trainer.model)}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        if name.endswith(".trained"):
            assert not torch.equal(p, base[name]), name
        else:
            assert torch.equal(p, base[name]), name
    for layer, experts in policy.selection.items():
        m = trainer.model.layers[layer].mlp.experts.up_proj
        assert isinstance(m, SelectedExperts) and m.selected.tolist() == experts
        merged = m.merged_weight()
        others = [e for e in range(8) if e not in experts]
        assert torch.equal(merged[others], m.weight[others])
    sel = [e for e in _lines(Path(c.out) / "events.jsonl") if e["event"] == "esft_selection"][0]
    assert sel["selection"] == {str(k): v for k, v in policy.selection.items()}


# --- resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,options", [
    ("epng", ["--epng-warmup", "4", "--epng-interval", "4"]),  # events at 4, 8 | 12, 16 (none at the last)
    ("dmep", ["--dmep-prune-step", "13", "--dmep-log-interval", "3"]),  # pruning inside the resumed half
])
def test_resume_is_bit_identical(tmp_path, policy, options):
    base = ["--policy", policy, "--steps", "20", *options]
    assert _run(tmp_path, "full", *base)[0] == 0
    assert _run(tmp_path, "half", *base, "--stop-at", "10")[0] == 0
    half = tmp_path / "half"
    assert json.loads((half / "checkpoint" / "trainer.json").read_text())["step"] == 10
    base_written = (half / "base/model.safetensors").stat().st_mtime_ns
    assert train.main(["--resume", str(half), *base]) == 0
    assert (half / "base/model.safetensors").stat().st_mtime_ns == base_written  # the adapter's base is kept
    full = tmp_path / "full"
    a, b = load_file(str(full / "checkpoint/model.safetensors")), load_file(str(half / "checkpoint/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = torch.load(full / "checkpoint/optimizer.pt", weights_only=False)
    ob = torch.load(half / "checkpoint/optimizer.pt", weights_only=False)
    assert oa["optimizer"]["groups"] == ob["optimizer"]["groups"] and oa["scheduler"] == ob["scheduler"]
    for name, st in oa["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["optimizer"]["state"][name][k]), (name, k)
    ja, jb = (json.loads((d / "checkpoint/trainer.json").read_text()) for d in (full, half))
    assert ja["layout"] == jb["layout"]
    strip = lambda d: [{k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")}
                       for m in _lines(d / "metrics.jsonl")]
    assert strip(full) == strip(half)
    assert (full / "events.jsonl").read_text() == (half / "events.jsonl").read_text()
    kinds = {"epng": "prune_grow", "dmep": "dmep_prune"}
    assert any(e["event"] == kinds[policy] and e["step"] > 10 for e in _lines(half / "events.jsonl"))


def test_interrupt_saves_and_resume_continues(tmp_path, monkeypatch):
    c = TrainConfig(policy="lora", out=str(tmp_path / "i"), steps=6, batch_size=2)
    trainer = Trainer(c, show_progress=False).setup()
    real = trainer.train_step

    def step():
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 3: it finishes, is saved, the run stops
        return real()

    monkeypatch.setattr(trainer, "train_step", step)
    assert trainer.train() == {"interrupted": True, "step": 3, "exit_code": 130}
    assert json.loads((tmp_path / "i/checkpoint/trainer.json").read_text())["step"] == 3
    resumed = Trainer(TrainConfig(policy="lora", steps=6, batch_size=2, resume=str(tmp_path / "i")),
                      show_progress=False).setup()
    assert resumed.step == 3 and resumed.train()["steps"] == 6
    assert [m["step"] for m in _lines(tmp_path / "i/metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_second_ctrl_c_inside_a_step_saves_nothing_of_it(tmp_path, monkeypatch, capsys):
    c = TrainConfig(policy="lora", out=str(tmp_path / "i"), steps=6, batch_size=2, save_every=2)
    trainer = Trainer(c, show_progress=False).setup()
    real_observe = trainer.policy.observe

    def observe(*a, **k):
        if trainer.step == 4:
            raise KeyboardInterrupt  # inside step 5, after its data were drawn and its backward ran
        return real_observe(*a, **k)

    monkeypatch.setattr(trainer.policy, "observe", observe)
    assert trainer.train() == {"interrupted": True, "step": 4, "exit_code": 130}
    assert "interrupted inside step 5: nothing saved from it" in capsys.readouterr().out
    assert json.loads((tmp_path / "i/checkpoint/trainer.json").read_text())["step"] == 4
    # resuming from the kept checkpoint gives exactly the uninterrupted run
    Trainer(TrainConfig(policy="lora", steps=6, batch_size=2, resume=str(tmp_path / "i")), show_progress=False).train()
    Trainer(TrainConfig(policy="lora", out=str(tmp_path / "u"), steps=6, batch_size=2),
            show_progress=False).train()
    a, b = load_file(tmp_path / "i/checkpoint/model.safetensors"), load_file(tmp_path / "u/checkpoint/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys):
    rc, out = _run(tmp_path, "n", "--policy", "lora", "--steps", "4", "--save-every", "2")
    assert rc == 0
    before = (out / "checkpoint/model.safetensors").read_bytes()
    c = TrainConfig(policy="lora", steps=8, batch_size=4, resume=str(out))
    trainer = Trainer(c, show_progress=False).setup()
    with torch.no_grad():
        trainer.model.layers[0].mlp.experts.gate_proj.lora_B_of(0).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 5.*the last good checkpoint is"):
        trainer.train()
    assert (out / "checkpoint/model.safetensors").read_bytes() == before
    assert json.loads((out / "checkpoint/trainer.json").read_text())["step"] == 4


def test_non_finite_gradient_with_a_finite_loss_stops_before_the_step(tmp_path):
    rc, out = _run(tmp_path, "g", "--policy", "lora", "--steps", "4", "--save-every", "2", "--max-grad-norm", "0")
    assert rc == 0
    trainer = Trainer(TrainConfig(policy="lora", steps=8, batch_size=4, resume=str(out)), show_progress=False).setup()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    a = trainer.model.layers[0].mlp.experts.gate_proj.lora_A
    a.register_hook(lambda g: torch.full_like(g, float("inf")))  # the loss stays finite, the gradient does not
    with pytest.raises(TrainingError, match=r"non-finite gradient norm \(inf\) at step 5"):
        trainer.train()
    assert all(torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert json.loads((out / "checkpoint/trainer.json").read_text())["step"] == 4


# --- data ---------------------------------------------------------------------------------------
def test_data_formats_and_prompt_masking(tmp_path):
    rows = [{"query": "q1", "response": "r1"}, {"question": "q2", "answer": "r2\n#### 2"},
            {"instruction": "write", "input": "x", "output": "code"}, {"prompt": "p", "response": "r"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = read_pairs(f)
    assert [p[1] for p in pairs] == ["r1", "r2\n#### 2", "code", "r", "yo"]
    assert pairs[2][0] == "write\n\nx"
    tok = byte_tokenizer()
    ids, labels = encode_pair(tok, "What is 2+2?", "4", max_len=64)
    n_prompt = len(tok.encode("What is 2+2?\n"))
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[n_prompt:-1]) == "4"
    long_ids, long_labels = encode_pair(tok, "x" * 100, "y" * 100, max_len=40)
    assert len(long_ids) == 40 and sum(v != -100 for v in long_labels) == 20
    data = Dataset.build(pairs, tok, max_len=64, packing=True)
    assert len(data) == 1 and data.next_batch(2).input_ids.shape[0] == 2


def test_bad_inputs_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--policy", "nope"])
    assert "--policy 'nope': unknown; choose from lora, epng, dmep, esft, full" in capsys.readouterr().err
    assert _run(tmp_path, "b", "--policy", "lora", "--data", str(tmp_path / "missing.jsonl"))[0] == 2
    assert f"data file {tmp_path / 'missing.jsonl'} does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response"\n')
    assert _run(tmp_path, "c", "--policy", "lora", "--data", str(bad))[0] == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"text": "a"}\n')
    assert _run(tmp_path, "d", "--policy", "lora", "--data", str(unknown))[0] == 2
    assert f"{unknown}:1: no known format (keys: text)" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _run(tmp_path, "e", "--policy", "lora", "--data", str(empty))[0] == 2
    assert "the dataset is empty" in capsys.readouterr().err
    assert _run(tmp_path, "f", "--policy", "lora", "--lora-dense-targets", "qq_proj")[0] == 2
    err = capsys.readouterr().err
    assert "targets ['qq_proj'] match no dense linear" in err and "available: ['k_proj', 'o_proj', 'q_proj', 'v_proj']" in err
    assert _run(tmp_path, "g", "--policy", "lora", "--steps", "1")[0] == 0
    assert _run(tmp_path, "g", "--policy", "lora", "--steps", "1")[0] == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--policy", "lora", "--epng-alpha", "0.3"])
    assert "options ['--epng-*'] do not belong to --policy lora" in capsys.readouterr().err


def test_toml_config_and_cli_precedence(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[train]\npolicy = "epng"\nsteps = 7\nlr = 3e-4\n\n[epng]\nalpha = 0.3\ninterval = 5\n')
    c = train.resolve(["--config", str(cfg), "--steps", "9"])
    assert c.policy == "epng" and c.steps == 9 and c.lr == 3e-4
    assert c.policy_options == {"alpha": 0.3, "interval": 5}
    # the embedded-default scaling fills what neither a file nor the command line sets
    assert train.resolve(["--policy", "esft"]).policy_options == {"sample_batches": 8}
    assert train.resolve(["--policy", "esft", "--esft-sample-batches", "3"]).policy_options == {"sample_batches": 3}
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    with pytest.raises(SystemExit):
        train.resolve(["--config", str(bad)])


def test_runs_end_with_a_loadable_fine_tune(tmp_path):
    rc, out = _run(tmp_path, "lora", "--policy", "lora", "--steps", "3", "--lr", "1e-2")
    assert rc == 0 and (out / "base/tokenizer.json").is_file()
    trained = Trainer(TrainConfig(policy="lora", steps=3, batch_size=4, resume=str(out)), show_progress=False).setup()
    model = minimoe.from_pretrained(out / "base").load_adapter(out / "adapter")
    ids = torch.randint(0, 257, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained.model.eval()(ids).logits)
    assert json.loads((out / "summary.json").read_text())["export"] == str(out / "adapter")
    rc, full = _run(tmp_path, "full", "--policy", "full", "--steps", "2")
    assert rc == 0 and (full / "model/model.safetensors").is_file() and not (full / "adapter").exists()
    assert minimoe.load_tokenizer(full / "model").encode("12 + 7") == byte_tokenizer().encode("12 + 7")


def _grads_of_first_step(tmp_path, name, batch_size, grad_accum):
    c = TrainConfig(policy="lora", model="tiny-olmoe", out=str(tmp_path / name), steps=2, batch_size=batch_size,
                    grad_accum=grad_accum, eval_limit=0, max_grad_norm=0.0)
    trainer = Trainer(c, show_progress=False).setup()
    grads, calls, real = {}, [], trainer.policy.observe

    def observe(out, mask):
        real(out, mask)
        calls.append(1)
        if len(calls) == grad_accum:  # the step's gradient is complete
            grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.policy.observe = observe
    trainer.train_step()
    return grads


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """Micro-batches weigh by their target tokens: 2 x 4 gives the gradient of 1 x 8 (same examples)."""
    big, small = _grads_of_first_step(tmp_path, "big", 8, 1), _grads_of_first_step(tmp_path, "small", 4, 2)
    assert big.keys() == small.keys() and big
    for n in big:
        assert torch.allclose(big[n], small[n], rtol=1e-4, atol=1e-7), n


def test_overwrite_keeps_the_old_run_when_the_new_input_is_bad(tmp_path, capsys):
    rc, out = _run(tmp_path, "keep", "--policy", "lora", "--steps", "1")
    assert rc == 0
    before = sorted(p.name for p in out.iterdir())
    rc, _ = _run(tmp_path, "keep", "--policy", "lora", "--steps", "1", "--overwrite",
                 "--data", str(tmp_path / "missing.jsonl"))
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before and (out / "checkpoint/trainer.json").is_file()
    # errors found only once the model is loaded and the policy set up (targets) cost nothing either
    for bad in (["--lora-dense-targets", "qq_proj"], ["--policy", "esft", "--esft-targets", "foo_proj"]):
        rc, _ = _run(tmp_path, "keep", "--policy", "lora", "--steps", "1", "--overwrite", *bad)
        err = capsys.readouterr().err
        assert rc == 2 and ("qq_proj" in err or "foo_proj" in err), err
        assert sorted(p.name for p in out.iterdir()) == before and (out / "checkpoint/trainer.json").is_file()


def test_resume_with_more_steps_follows_the_new_schedule_at_once(tmp_path):
    rc, out = _run(tmp_path, "s", "--policy", "lora", "--steps", "8", "--stop-at", "4")
    assert rc == 0
    assert train.main(["--resume", str(out), "--steps", "16", "--stop-at", "5"]) == 0
    fresh = _run(tmp_path, "f", "--policy", "lora", "--steps", "16", "--stop-at", "5")[1]
    lr_resumed = _lines(out / "metrics.jsonl")[-1]["lr"]
    lr_fresh = _lines(fresh / "metrics.jsonl")[-1]["lr"]
    assert lr_resumed == pytest.approx(lr_fresh, rel=1e-12)  # step 5 of a 16-step schedule, not of the old one


def test_a_failed_checkpoint_swap_keeps_the_previous_copy(tmp_path, monkeypatch):
    from minimoe.train import checkpoint as ckpt
    from minimoe.utils.files import atomic_dir

    dst = tmp_path / "checkpoint"
    with atomic_dir(dst) as tmp:
        (tmp / "trainer.json").write_text('{"step": 1}')
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".checkpoint.tmp-"):
            raise KeyboardInterrupt  # interrupted between moving the old copy aside and moving the new one in
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dst, overwrite=True) as tmp:
            (tmp / "trainer.json").write_text('{"step": 2}')
    monkeypatch.undo()
    assert json.loads((dst / "trainer.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # a crash (no chance to restore) leaves only the previous copy aside: resume finds it
    dst.rename(tmp_path / ".checkpoint.old")
    assert ckpt.locate(tmp_path) == tmp_path / ".checkpoint.old"
    assert ckpt.read_info(ckpt.locate(tmp_path)) == {"step": 1}


def test_the_trainer_resolves_a_copy_of_its_config(tmp_path):
    c = TrainConfig(policy="lora", out=str(tmp_path / "r"), epochs=1.0, batch_size=64, eval_limit=0)
    trainer = Trainer(c, show_progress=False)
    assert not trainer.ready and not (tmp_path / "r").exists()  # construction reads and writes nothing
    trainer.setup()
    assert (c.model, c.steps) == ("", TrainConfig.steps)  # the caller's object is untouched
    assert trainer.config.model == "tiny-olmoe" and trainer.config.steps == 8  # 512 tiny-arith examples / 64
