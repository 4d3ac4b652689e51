"""Resume flags mean what they say (config.RESUME_MAY_CHANGE): a flag a resume may change applies from the
resumed step (--lr rebuilds the schedule at the current step, announced and logged), any other flag given with
another value is refused naming it, before anything in the run directory changes."""

import json
import shutil

import pytest

from minimoe.cli import train as train
from minimoe.train.config import RESUME_MAY_CHANGE, TrainConfig

TINY = ["--policy", "lora", "--model", "tiny-olmoe", "--batch-size", "2", "--eval-limit", "0", "--lr", "1e-3"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A lora run stopped at step 2 of 6, and the same run never stopped."""
    base = tmp_path_factory.mktemp("resume_flags")
    assert train.main([*TINY, "--steps", "6", "--stop-at", "2", "--out", str(base / "stopped")]) == 0
    assert train.main([*TINY, "--steps", "6", "--out", str(base / "whole")]) == 0
    return base / "stopped", base / "whole"


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "copy")
    return tmp_path / "copy"


def test_a_new_lr_on_resume_rebuilds_the_schedule_at_the_current_step(runs, tmp_path, capsys):
    run = _copy(runs[0], tmp_path)
    assert train.main(["--resume", str(run), "--lr", "2e-3", "--weight-decay", "0.1"]) == 0
    out = capsys.readouterr().out
    whole = _lines(runs[1] / "metrics.jsonl")
    lrs = [m["lr"] for m in _lines(run / "metrics.jsonl")]
    assert lrs[:2] == [m["lr"] for m in whole[:2]]  # before the resume: the run's
    assert lrs[2:] == [2 * m["lr"] for m in whole[2:]]  # after: the same linear schedule with twice the peak
    assert (f"--lr 0.002 (was 0.001): the learning rate goes from {whole[2]['lr']:.3g} to {lrs[2]:.3g} at step 3, "
            "then follows the linear schedule of a 6-step run with peak 0.002") in out
    event = [e for e in _lines(run / "events.jsonl") if e["event"] == "schedule"]
    assert event == [{"event": "schedule", "step": 2, "changed": {"lr": [0.001, 0.002]}, "steps_planned": 6,
                      "steps": 6, "lr_before": whole[2]["lr"], "lr_after": lrs[2]}]
    saved = json.loads((run / "checkpoint" / "trainer.json").read_text())["args"]
    assert saved["lr"] == 0.002 and saved["weight_decay"] == 0.1  # and a later resume starts from these


def test_a_resume_without_flags_changes_nothing(runs, tmp_path):
    run = _copy(runs[0], tmp_path)
    assert train.main(["--resume", str(run)]) == 0
    strip = lambda r: [{k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")}
                       for m in _lines(r / "metrics.jsonl")]
    assert strip(run) == strip(runs[1])
    assert not (run / "events.jsonl").exists()  # lora logs no events: no schedule event either


@pytest.mark.parametrize("flags, named", [
    (["--max-len", "64"], "--max-len 64 (the run's: 256)"),
    (["--data", "README.md"], "--data 'README.md' (the run's: 'tiny-arith')"),
    (["--seed", "3"], "--seed 3 (the run's: 0)"),
    (["--lora-rank", "4"], "--lora-rank 4 (the run's: 8)"),
    (["--policy", "epng"], "--policy 'epng' (the run's: 'lora')"),
    (["--out", "elsewhere"], "--out do not go with --resume"),
    (["--overwrite"], "--overwrite do not go with --resume"),
])
def test_a_flag_a_resume_cannot_change_is_refused_naming_it(runs, tmp_path, capsys, flags, named):
    run = _copy(runs[0], tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run), *flags])
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_every_field_is_either_changeable_on_resume_or_checked():
    fields = set(TrainConfig.__dataclass_fields__) - {"resume", "policy_options", "out", "overwrite"}
    assert set(RESUME_MAY_CHANGE) <= fields  # a name that is not a field would be a typo that refuses nothing
