"""The memory plan (``minimoe plan``): exact counts against real models, the shipped reference shapes
against transformers' own models (on the meta device), the arithmetic of the memory terms, the verdict, the
activation formula against what autograd really saves, and the errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from minimoe.adapters.lm import CausalLM
from minimoe.tools.plan import (activation_bytes, build, load_config, main, parse_memory, plan, shipped_shapes)
from minimoe.policies import Context, make_policy

GIB = 2**30


def _real(name: str, policy: str, options: dict | None = None, esft_experts: int | None = None):
    """The model ``train.py`` would train (random weights, real tensors), its policy attached."""
    config, _ = load_config(name)
    torch.manual_seed(0)
    model = CausalLM(config)
    pol = make_policy(policy, options or {})
    if policy == "esft":
        pol.selection = {layer: list(range(esft_experts)) for layer in config.moe_layers}
    pol.setup(model, Context(dataset=None))
    return model, pol.trainable_parameters(model)


@pytest.mark.parametrize("name, policy, options, esft", [
    ("tiny-olmoe", "lora", {}, None),
    ("tiny-olmoe", "epng", {"rank": 4, "targets": ("gate_proj", "up_proj", "down_proj")}, None),
    ("tiny-olmoe", "lora", {"dense_targets": ("q_proj", "v_proj")}, None),
    ("tiny-qwen2-moe", "esft", {}, 3),
    ("tiny-qwen2-moe", "full", {}, None),
    ("tiny-qwen3", "dmep", {}, None),
    ("tiny-qwen3-moe", "dmep", {"num_experts": 4, "targets": ("q_proj", "o_proj")}, None),
])
def test_counts_are_those_of_the_real_model(name, policy, options, esft):
    model, trainable = _real(name, policy, options, esft)
    p = plan(name, policy, options, batch=2, length=16, device="cpu", esft_experts=esft)
    assert p.parameters + p.adapter_parameters == model.num_parameters()
    assert p.trainable == sum(t.numel() for t in {id(t): t for t in trainable}.values())
    assert p.trainable == model.num_parameters(trainable_only=True)
    fp32 = p.parameters * 4 + p.adapter_parameters * 4
    assert p.weights == fp32  # float32 base, fp32 adapters, one process
    assert p.gradients == p.trainable * 4
    assert p.optimizer == 2 * p.trainable * 4 + 4 * len({id(t) for t in trainable})  # two moments and a step


def test_hand_counted_lora_and_the_olmoe_paper_budget():
    # tiny-olmoe: 2 MoE layers x 8 experts x (gate, up) x rank 8 x (in 64 + out 32)
    assert plan("tiny-olmoe", "lora", device="cpu", batch=1, length=8).trainable == 2 * 8 * 2 * 8 * (64 + 32)
    # OLMoE-1B-7B, expert LoRA r=8 on gate+up: 16 layers x 64 experts x 2 x 8 x (2048 + 1024) = the paper's 50.3M
    for policy in ("lora", "epng"):
        p = plan("allenai/OLMoE-1B-7B-0125", policy, batch=1, length=256, dtype="bfloat16")
        assert p.trainable == p.adapter_parameters == 50_331_648 == 16 * 64 * 2 * 8 * 3072
        assert p.parameters == 6_919_161_856
        assert p.weights == 6_919_161_856 * 2 + 50_331_648 * 4  # bf16 base, fp32 adapters


# exact totals minimoe computes for the shipped shapes (checked against transformers below)
SHIPPED_TOTALS = {
    "allenai/OLMoE-1B-7B-0125": 6_919_161_856,
    "Qwen/Qwen1.5-MoE-A2.7B": 14_315_784_192,
    "Qwen/Qwen3-0.6B": 596_049_920,  # tied embeddings: the head is the embedding
    "Qwen/Qwen3-8B": 8_190_735_360,
    "Qwen/Qwen3-30B-A3B": 30_532_122_624,
}


def test_shipped_shapes_load_offline_and_match_transformers(monkeypatch):
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert set(shipped_shapes()) == set(SHIPPED_TOTALS)
    for name, total in SHIPPED_TOTALS.items():
        config, source = load_config(name)
        assert "shipped" in source and config.name_or_path == name
        model, _, _ = build(config, "full")
        assert model.num_parameters() == total, name
        raw = json.loads(shipped_shapes()[name].read_text())
        hf_config = transformers.AutoConfig.for_model(**raw)
        with torch.device("meta"):
            reference = transformers.AutoModelForCausalLM.from_config(hf_config)
        assert reference.num_parameters() == total, name


def test_memory_terms_and_the_verdict(capsys):
    lora = dict(policy="lora", batch=1, length=256, dtype="bfloat16")
    p = plan("allenai/OLMoE-1B-7B-0125", gpu_memory=80 * GIB, **lora)
    assert p.total == p.weights + p.gradients + p.optimizer + p.activations + p.gathered + p.autocast_copies
    assert p.gathered == 0 and p.autocast_copies == 0  # one process, bf16 base
    assert p.fits is True and 13 * GIB < p.total < 18 * GIB
    assert plan("allenai/OLMoE-1B-7B-0125", gpu_memory=8 * GIB, **lora).fits is False
    assert main(["--policy", "lora", "--batch-size", "1", "--dtype", "bfloat16", "--gpu-memory", "80GiB"]) == 0
    assert "fits in 80.00 GiB" in capsys.readouterr().out
    assert main(["--policy", "lora", "--batch-size", "1", "--dtype", "bfloat16", "--gpu-memory", "8GiB"]) == 1
    assert "does NOT fit in 8.00 GiB" in capsys.readouterr().out
    # full fine-tuning of OLMoE: fp32 weights + grads + two moments = 16 bytes a parameter, more than 80 GiB
    full = plan("allenai/OLMoE-1B-7B-0125", "full", batch=1, length=256, gpu_memory=80 * GIB)
    assert full.weights + full.gradients + full.optimizer == 16 * 6_919_161_856 + 4 * len(list(
        build(load_config("allenai/OLMoE-1B-7B-0125")[0], "full")[2]))
    assert full.fits is False
    # FSDP over 8: the base and full fine-tuning's state are divided; the gathered root and layers are added
    sharded = plan("allenai/OLMoE-1B-7B-0125", "full", batch=1, length=256, world_size=8, fsdp=True)
    assert sharded.weights == full.weights // 8 and sharded.gradients == full.gradients // 8
    assert sharded.optimizer < full.optimizer / 7 and sharded.gathered > 0
    assert sharded.autocast_copies == full.autocast_copies  # bf16 copies of the gathered fp32 weights, kept
    # gradient checkpointing only lowers activations
    ckpt = plan("allenai/OLMoE-1B-7B-0125", checkpointing=True, **lora)
    assert ckpt.activations < p.activations and ckpt.weights == p.weights
    # CUDA with an fp32 base: autocast's bf16 weight copies are counted
    fp32 = plan("allenai/OLMoE-1B-7B-0125", "lora", batch=1, length=256)
    assert fp32.autocast_copies > 12 * GIB


def _saved_bytes(model, ids) -> int:
    """Bytes of the tensors autograd saves in a training forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("name, policy", [("bench:tiny", "lora"), ("bench:tiny", "full"),
                                          ("bench:tiny/dense", "dmep"), ("tiny-qwen2-moe", "epng")])
def test_activation_formula_against_what_autograd_saves(name, policy):
    config, _ = load_config(name)
    B, T = 4, 256
    meta, _, _ = build(config, policy)
    est = activation_bytes(meta, B, T, 4, checkpointing=False)
    model, _ = _real(name, policy)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    saved = _saved_bytes(model, ids)
    # the formula's head also holds the returned logits (alive, not saved): compare without them
    planned = est["layers"] + est["head"] - B * T * config.vocab_size * 4
    assert 0.9 < planned / saved < 1.15, (planned, saved)


def test_memory_sizes_and_errors(monkeypatch, capsys):
    assert parse_memory("80GiB") == 80 * GIB and parse_memory("80GB") == 80 * 10**9
    assert parse_memory("24576MiB") == 24 * GIB and parse_memory("80") == 80 * GIB
    with pytest.raises(ValueError, match="--gpu-memory '80 parsecs'"):
        parse_memory("80 parsecs")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="'nobody/no-such-model'.*HF_HUB_OFFLINE is set"):
        load_config("nobody/no-such-model")
    with pytest.raises(FileNotFoundError, match="not a local directory, a tiny preset"):
        load_config("no-such-thing")
    with pytest.raises(ValueError, match="bench:olmoe-1b-7b/dense: benchmark shape olmoe-1b-7b has no 'dense' model"):
        load_config("bench:olmoe-1b-7b/dense")
    assert main(["--model", "nobody/no-such-model"]) == 2
    assert "error: --model 'nobody/no-such-model'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--dtype bfloat16 with --policy full"):
        plan("tiny-olmoe", "full", dtype="bfloat16")
    with pytest.raises(ValueError, match="--fsdp needs --world-size"):
        plan("tiny-olmoe", "lora", fsdp=True)
    with pytest.raises(ValueError, match="--max-len 100000"):
        plan("tiny-olmoe", "lora", length=100_000)
    with pytest.raises(SystemExit):
        main(["--policy", "lora", "--epng-alpha", "0.3"])  # another policy's option
    assert "options of --policy epng" in capsys.readouterr().err


def test_local_directory_and_esft_default_selection(tmp_path):
    raw = json.loads(shipped_shapes()["Qwen/Qwen3-30B-A3B"].read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw))
    p = plan(str(tmp_path), "esft", batch=1, length=64)
    assert p.parameters == SHIPPED_TOTALS["Qwen/Qwen3-30B-A3B"]
    # token score, top_p 0.2: ceil(0.2 x 128) = 26 experts per layer, their gate, up and down trained in full
    assert p.trainable == 48 * math.ceil(0.2 * 128) * 3 * 768 * 2048


def test_train_py_plan_prints_the_runs_plan_and_trains_nothing(capsys, tmp_path, monkeypatch):
    from minimoe.cli import train as train

    monkeypatch.chdir(tmp_path)
    assert train.main(["--policy", "epng", "--plan", "--device", "cpu"]) == 0  # the shipped tiny-moe
    out = capsys.readouterr().out
    assert "minimoe/weights/tiny-moe/config.json" in out
    assert "policy epng, batch 16 x 256 tokens" in out  # the embedded run's batch
    assert "trainable parameters                      131,072" in out  # the README's epng budget
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_plan_check_measures_a_real_cpu_step():
    from minimoe.tools.plan_check import check

    r = check("bench:medium", "lora", steps=2, threads=1)
    assert r["trainable"] == 786_432  # 4 layers x 32 experts x (gate, up) x 8 x (256 + 128)
    assert r["measured"] > 100 * 2**20 and r["baseline"] > 0
    assert 0.8 < r["ratio"] < 1.2, r  # README: 0.95 for this run


def test_train_plan_takes_gpu_memory_and_json_and_refuses_them_alone(capsys, tmp_path, monkeypatch):
    from minimoe.cli import train

    monkeypatch.chdir(tmp_path)
    argv = ["--policy", "epng", "--plan", "--device", "cpu", "--gpu-memory", "1MiB"]
    assert train.main(argv) == 1 and "does NOT fit in 1.0 MiB" in capsys.readouterr().out
    assert train.main([*argv[:-2], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == 131_072
    assert train.main(["--policy", "epng", "--json"]) == 2
    assert "--gpu-memory and --json go with --plan" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_train_help_lists_its_flags_once_and_plainly(capsys):
    from minimoe.train.config import build_parser, resolve

    text = build_parser().format_help()
    assert all(f in text for f in ("--plan", "--gpu-memory SIZE", "--json", "--lora-alpha LORA_ALPHA"))
    assert "--lora-lora-alpha" not in text and "(default: -1.0)" not in text
    assert resolve(["--policy", "lora", "--lora-lora-alpha", "4"], embedded=False).policy_options == {"lora_alpha": 4.0}
