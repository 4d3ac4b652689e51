"""The run directory owns every file of a run; a non-writer (another rank) writes nothing; TrainConfig carries
its own help and choices, and resolve() lives in the package."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import minimoe
from minimoe.model.shipped import shipped
from minimoe.train.run_dir import EVENTS, METRICS, RunDir, RunDirError
from minimoe.train.config import TrainConfig, build_parser, resolve
from minimoe.train.trainer import Trainer


def test_logs_summary_and_truncation(tmp_path):
    run = RunDir(tmp_path / "r")
    run.clear()
    for step in (1, 2, 3):
        run.append(METRICS, {"step": step, "loss": 1.0 / step})
        run.append(EVENTS, {"step": step, "event": "x"})
    run.truncate_logs(2)
    assert [r["step"] for r in run.read_log(METRICS)] == [1, 2] and run.count(EVENTS) == 2
    run.write_summary({"steps": 3})
    assert run.update_summary(score=0.5) == {"steps": 3, "score": 0.5}
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {"steps": 3, "score": 0.5}
    with pytest.raises(RunDirError, match="exists and is not empty; pass --overwrite"):
        RunDir(tmp_path / "r").check_new(overwrite=False)
    RunDir(tmp_path / "r").check_new(overwrite=True)  # allowed; nothing removed until clear()
    assert (tmp_path / "r" / "summary.json").is_file()


def test_a_silent_run_directory_writes_nothing(tmp_path):
    """What every rank but the writer gets: the same calls, no file."""
    run = RunDir(tmp_path / "silent", writer=False)
    run.clear()
    run.append(METRICS, {"step": 1})
    run.write_summary({"steps": 1})
    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset("tiny-olmoe"))
    model.add_expert_lora(rank=2)
    assert run.export(model) == tmp_path / "silent" / "adapter"
    opt = torch.optim.AdamW(model.adapter_parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run.save_checkpoint(model, opt, sched, {"step": 1}, {})
    assert not (tmp_path / "silent").exists()


def test_a_trainer_with_a_silent_run_directory_trains_and_writes_nothing(tmp_path, monkeypatch):
    import minimoe.train.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "RunDir", lambda path, writer=True: RunDir(path, writer=False))
    c = TrainConfig(policy="esft", model="tiny-olmoe", out=str(tmp_path / "quiet"), steps=2, batch_size=2,
                    save_every=1, eval_limit=0, policy_options={"sample_batches": 1})
    summary = Trainer(c, show_progress=False).train()
    assert summary["steps"] == 2 and not (tmp_path / "quiet").exists()


def test_every_train_option_carries_its_help_and_resolve_is_reusable(tmp_path):
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
    text = build_parser().format_help()
    assert "tokens counted by routing statistics" in text and "{all,response}" in text
    assert "--policy-options" not in text  # set through --<policy>-<option>
    c = resolve(["--policy", "dmep", "--steps", "7", "--dmep-tau", "0.2"], embedded=False)  # plain defaults
    assert (c.policy, c.steps, c.batch_size, c.policy_options) == ("dmep", 7, 8, {"tau": 0.2})
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nsteps = 5\n[epng]\nalpha = 0.3\n')
    assert resolve(["--config", str(toml)], embedded=False).policy_options == {"alpha": 0.3}


def test_a_shipped_model_trains_with_the_embedded_defaults_whether_named_or_default():
    bare = resolve(["--policy", "dmep"])
    assert bare.model == "tiny-dense" and (bare.steps, bare.batch_size, bare.lr) == (300, 16, 3e-3)
    named = resolve(["--policy", "lora", "--model", "tiny-dense", "--lr", "1e-3"])
    assert named.model == "tiny-dense" and (named.steps, named.batch_size, named.lr) == (300, 16, 1e-3)
    by_path = resolve(["--policy", "lora", "--model", str(shipped("tiny-dense"))])
    assert by_path.model == str(shipped("tiny-dense")) and (by_path.steps, by_path.batch_size) == (300, 16)
    old = Path(__file__).resolve().parents[1] / "weights" / "tiny-dense"  # where a clone had it before 2026-12-06
    assert resolve(["--policy", "lora", "--model", str(old)]).steps == 300
    preset = resolve(["--policy", "lora", "--model", "tiny-qwen3"])
    assert (preset.steps, preset.batch_size) == (TrainConfig.steps, TrainConfig.batch_size)  # not a shipped model


def test_a_run_is_read_through_its_run_directory(tmp_path):
    run = RunDir(tmp_path / "r")
    assert not run.occupied() and not run.is_run() and run.summary() == {} and run.metrics() == []
    run.path.mkdir()
    run.write_json("args.json", {"policy": "lora"})
    run.append(METRICS, {"step": 1, "loss": 2.0})
    run.append(EVENTS, {"event": "prune_grow", "step": 1})
    (tmp_path / "r" / METRICS).open("a").write("\n")  # blank lines are skipped
    run.write_summary({"steps": 1})
    reader = RunDir(tmp_path / "r", writer=False)
    assert reader.is_run() and reader.args() == {"policy": "lora"} and reader.summary() == {"steps": 1}
    assert reader.metrics() == [{"step": 1, "loss": 2.0}] and reader.events()[0]["event"] == "prune_grow"
    (tmp_path / "file").write_text("x")
    assert RunDir(tmp_path / "file").occupied()  # a file in the way counts too
