"""Defaults that follow the papers (issue 14): the schedule per policy, --epochs, EPnG without Alg. 1's event at
the last step and its Fig. 3a ablation modes, statistics over all real tokens; each recorded in args.json, and
runs written before a default changed resume with what they were trained with."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_training import _lines, _run

from minimoe.train.config import TrainConfig, resolve
from minimoe.train.trainer import lr_schedule

LEGACY = Path(__file__).parent / "data" / "legacy-v0"


def _lrs(kind, steps=10, warmup=0.2):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = lr_schedule(opt, steps, warmup, kind)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_against_their_formulas():
    warm = [2.0 * (s + 1) / 2 for s in range(2)]  # 2 warm-up steps of 10, then decay over the other 8
    assert _lrs("linear") == pytest.approx(warm + [2.0 * (1 - (s - 2) / 8) for s in range(2, 10)])
    assert _lrs("cosine") == pytest.approx(warm + [1.0 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)])
    assert _lrs("constant") == pytest.approx(warm + [2.0] * 8)
    assert _lrs("linear", warmup=0.0) == pytest.approx([2.0 * (1 - s / 10) for s in range(10)])  # Trainer default


def test_each_policy_gets_its_papers_schedule_unless_told():
    assert (TrainConfig(policy="epng").schedule, TrainConfig(policy="epng").warmup_ratio) == ("linear", 0.0)
    assert (TrainConfig(policy="esft").schedule, TrainConfig(policy="full").schedule) == ("linear", "linear")
    assert (TrainConfig(policy="dmep").schedule, TrainConfig(policy="dmep").warmup_ratio) == ("cosine", 0.1)
    c = resolve(["--policy", "dmep", "--schedule", "constant", "--warmup-ratio", "0"])
    assert (c.schedule, c.warmup_ratio) == ("constant", 0.0)
    assert TrainConfig().stats_tokens == "all"  # EPnG Eq. 6 and DMEP Eqs. 8-9 count every processed token


def test_a_run_records_its_schedule_and_follows_it(tmp_path):
    rc, out = _run(tmp_path, "r", "--policy", "lora", "--steps", "4", "--lr", "1e-3")
    assert rc == 0
    args = json.loads((out / "args.json").read_text())
    assert (args["schedule"], args["warmup_ratio"], args["stats_tokens"]) == ("linear", 0.0, "all")
    assert [m["lr"] for m in _lines(out / "metrics.jsonl")] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_epochs_set_the_steps_from_the_data(tmp_path, capsys):
    rc, out = _run(tmp_path, "e", "--policy", "lora", "--epochs", "0.25", "--lr", "1e-3")
    assert rc == 0
    steps = math.ceil(0.25 * 512 / 4)  # tiny-arith: 512 training problems, batch 4
    assert json.loads((out / "args.json").read_text())["steps"] == steps == 32
    assert len(_lines(out / "metrics.jsonl")) == steps
    assert f"--epochs 0.25: {steps} steps (512 examples, global batch 4)" in capsys.readouterr().out


def _events(out):
    return [e for e in _lines(out / "events.jsonl") if e["event"] == "prune_grow"]


def test_epng_fires_no_event_at_the_last_step_unless_asked(tmp_path):
    common = ["--policy", "epng", "--steps", "6", "--epng-warmup", "2", "--epng-interval", "2",
              "--epng-probe-batches", "0"]
    rc, out = _run(tmp_path, "default", *common)
    assert rc == 0 and [e["step"] for e in _events(out)] == [2, 4]
    rc, out = _run(tmp_path, "alg1", *common, "--epng-final-event")
    assert rc == 0 and [e["step"] for e in _events(out)] == [2, 4, 6]
    assert json.loads((out / "args.json").read_text())["policy_options"]["final_event"] is True


def test_epng_ablation_modes_prune_only_and_grow_only(tmp_path):
    common = ["--policy", "epng", "--steps", "3", "--epng-warmup", "2", "--epng-interval", "2",
              "--epng-probe-batches", "0", "--epng-alpha", "0.25", "--epng-beta", "0.25"]
    rc, out = _run(tmp_path, "prune", *common, "--epng-mode", "prune-only")
    (event,) = _events(out)
    assert rc == 0 and event["pruned"] and not event["grown"] and event["params_after"] < event["budget"]
    rc, out = _run(tmp_path, "grow", *common, "--epng-mode", "grow-only")
    (event,) = _events(out)
    assert rc == 0 and not event["pruned"] and event["grown"]
    # every expert adapted at r=8 on gate+up; a rank of one expert costs 2 x (in + out)
    cfg = json.loads((out / "base" / "config.json").read_text())
    experts = cfg["num_hidden_layers"] * cfg["num_experts"]  # tiny-olmoe: 2 x 8
    per_rank = 2 * (cfg["hidden_size"] + cfg["intermediate_size"])
    start = experts * 8 * per_rank
    freed = experts // 4 * 8 * per_rank  # what pruning 25% of the adapted experts would have freed
    assert event["params_before"] == start and event["params_after"] == start + freed == event["budget"]
    assert sum(d for _, _, d in event["grown"]) * per_rank == freed  # grown ranks, over the starting budget


def test_a_run_from_before_the_new_defaults_resumes_with_what_it_was_trained_with(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "dmep-run", run)
    c = resolve(["--resume", str(run)])
    assert (c.schedule, c.stats_tokens, c.policy_options["lb_reduce"]) == ("cosine", "response", "sum")
    shutil.copytree(LEGACY / "epng-run", tmp_path / "e")
    assert resolve(["--resume", str(tmp_path / "e")]).policy_options["final_event"] is True


def test_esft_can_train_the_shared_experts_too(tmp_path, capsys):
    import minimoe

    rc, out = _run(tmp_path, "s", "--policy", "esft", "--model", "tiny-qwen2-moe", "--steps", "2", "--lr", "1e-2",
                   "--esft-sample-batches", "1", "--esft-shared")
    assert rc == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["kinds"]) == {"esft", "trained_linear"}
    shared = {k for k in cfg["trained_linear"]}
    assert shared == {f"layers.{l}.mlp.shared_expert.{t}" for l in range(2) for t in ("gate_proj", "up_proj", "down_proj")}
    base = minimoe.from_pretrained(out / "base")
    tuned = minimoe.from_pretrained(out / "base").load_adapter(out / "adapter")
    # both sides come from this test's run, and the untrained gate is loaded, not computed: exact on any CPU
    for name in shared:  # the shared experts trained; their gate did not
        assert not torch.equal(tuned.get_submodule(name).trained, base.get_submodule(name).weight), name
    for l in range(2):
        assert torch.equal(tuned.layers[l].mlp.shared_expert_gate.weight, base.layers[l].mlp.shared_expert_gate.weight)
    rc, _ = _run(tmp_path, "o", "--policy", "esft", "--steps", "1", "--esft-sample-batches", "1", "--esft-shared")
    assert rc == 2 and "--esft-shared: this model has no shared experts" in capsys.readouterr().err


def test_the_policies_that_train_base_weights_say_so_and_bf16_bases_are_refused_for_them():
    from minimoe.policies import POLICIES
    from minimoe.tools.plan import plan

    assert sorted(n for n, cls in POLICIES.items() if cls.trains_base_weights) == ["esft", "full"]
    with pytest.raises(ValueError, match="--dtype bfloat16 with --policy full: minimoe train refuses it"):
        plan("tiny-olmoe", "full", {}, 2, 16, "bfloat16")
    assert plan("tiny-olmoe", "lora", {}, 2, 16, "bfloat16").total > 0
