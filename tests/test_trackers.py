"""``--report-to``: TensorBoard, W&B (offline) and trackio get every metric of ``metrics.jsonl`` at its step, the
events' numbers and text, the configuration and the summary; a resumed run continues the same tracker run; a
tracker that is missing or cannot start stops the run before anything is written."""

import json
import os
import subprocess
import sys
import types

import pytest

from minimoe.cli import train
from minimoe.train import trackers

ARGS = ["--policy", "epng", "--steps", "8", "--epng-warmup", "2", "--epng-interval", "3", "--eval-limit", "0",
        "--batch-size", "4", "--model", "tiny-olmoe"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_every_metric_and_event_and_a_resume_continues_it(tmp_path):
    out = tmp_path / "run"
    assert train.main(["--out", str(out), *ARGS, "--stop-at", "5", "--report-to", "tensorboard"]) == 0
    assert train.main(["--resume", str(out), "--report-to", "tensorboard"]) == 0
    acc, scalars = _scalars(out / "tensorboard")
    metrics = _lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 9))
    for name in ("loss", "lr", "grad_norm", "tokens", "trainable", "tokens_per_s"):
        logged = scalars[name]
        assert [s for s, _ in logged] == [m["step"] for m in metrics]  # each step once, across the resume
        assert all(v == pytest.approx(m[name], rel=1e-6) for (_, v), m in zip(logged, metrics))  # (stored as fp32)
    events = [e for e in _lines(out / "events.jsonl") if e["event"] == "prune_grow"]
    assert [s for s, _ in scalars["events/prune_grow/params_after"]] == [e["step"] for e in events] == [3, 6]
    texts = acc.Tags()["tensors"]
    assert {"config/text_summary", "events/prune_grow/text_summary", "summary/text_summary"} <= set(texts)


def test_tensorboard_drops_what_was_logged_after_the_checkpoint(tmp_path):
    """A run killed after its checkpoint had logged steps that the resume repeats: they are logged once."""
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    assert train.main(["--out", str(out), *ARGS, "--stop-at", "4", "--report-to", "tensorboard"]) == 0
    with SummaryWriter(str(out / "tensorboard")) as w:  # steps 5 and 6 of the killed run, never checkpointed
        for step in (5, 6):
            w.add_scalar("loss", 99.0, step)
    assert train.main(["--resume", str(out), "--report-to", "tensorboard"]) == 0
    _, scalars = _scalars(out / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == list(range(1, 9)) and 99.0 not in [v for _, v in scalars["loss"]]


class _FakeWandB(types.ModuleType):
    """What minimoe asks of ``wandb``: init (project, id, resume, dir, config), log at a step, summary, finish."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self
        run = types.SimpleNamespace(id=kwargs["id"] or "run0", summary={}, finish=lambda: None,
                                    log=lambda values, step: fake.logs.append((step, dict(values))))
        run.summary = types.SimpleNamespace(update=lambda d: fake.logs.append(("summary", dict(d))))
        return run

    @staticmethod
    def Html(text):
        return ("html", text)


def test_wandb_gets_metrics_events_config_and_the_same_run_on_resume(tmp_path, monkeypatch):
    fake = _FakeWandB()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: object())
    out = tmp_path / "run"
    assert train.main(["--out", str(out), *ARGS, "--stop-at", "5", "--report-to", "wandb"]) == 0
    assert train.main(["--resume", str(out), "--report-to", "wandb"]) == 0
    first, resumed = fake.inits
    assert first["id"] is None and resumed["id"] == "run0" and resumed["resume"] == "allow"  # the same run
    assert first["dir"] == str(out) and first["config"]["policy"] == "epng"
    assert first["config"]["policy_options"]["interval"] == 3
    losses = [(step, values["loss"]) for step, values in fake.logs if isinstance(values, dict) and "loss" in values]
    assert losses == [(m["step"], m["loss"]) for m in _lines(out / "metrics.jsonl")]
    texts = [step for step, values in fake.logs if "events/prune_grow" in values]
    assert texts == [3, 6]
    assert any(step == "summary" and values["summary/steps"] == 8 for step, values in fake.logs)


@pytest.mark.slow
def test_wandb_offline_writes_its_run_under_the_run_directory(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for extra in (["--out", str(out), *ARGS, "--stop-at", "5"], ["--resume", str(out)]):
        subprocess.run([sys.executable, "-m", "minimoe", "train", *extra, "--report-to", "wandb"], env=env,
                       check=True, capture_output=True, cwd=tmp_path)
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)  # the resume continued the same run


@pytest.mark.slow
def test_trackio_stores_every_metric_locally_and_a_resume_continues_it(tmp_path):
    out, store = tmp_path / "run", tmp_path / "trackio"
    env = {**os.environ, "TRACKIO_DIR": str(store)}
    for extra in (["--out", str(out), *ARGS, "--stop-at", "5"], ["--resume", str(out)]):
        subprocess.run([sys.executable, "-m", "minimoe", "train", *extra, "--report-to", "trackio"], env=env,
                       check=True, capture_output=True, cwd=tmp_path)
    name = json.loads((out / "trackers.json").read_text())["trackio"]
    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps([S.get_runs('minimoe'), S.get_logs('minimoe', sys.argv[1])]))")
    runs, logs = json.loads(subprocess.run([sys.executable, "-c", read, name], env=env, check=True,
                                           capture_output=True, text=True).stdout)
    assert runs == [name]  # one run, continued
    losses = sorted((log["step"], log["loss"]) for log in logs if "loss" in log)
    assert losses == [(m["step"], pytest.approx(m["loss"])) for m in _lines(out / "metrics.jsonl")]


def test_a_tracker_not_installed_or_failing_stops_the_run_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "run"
    assert train.main(["--out", str(out), *ARGS, "--report-to", "wandb"]) == 2
    assert "--report-to wandb needs the wandb package: pip install 'minimoe[wandb]'" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.undo()

    def broken(*args):
        raise ConnectionError("no network")

    monkeypatch.setitem(trackers._CLASSES, "tensorboard", broken)
    assert train.main(["--out", str(out), *ARGS, "--report-to", "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "--report-to tensorboard: the tracker could not start: ConnectionError: no network" in err
    assert not (out / "metrics.jsonl").exists()


def test_report_to_flag_takes_several_and_refuses_unknown(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandB())
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: object())
    out = tmp_path / "two"
    assert train.main(["--out", str(out), *ARGS, "--steps", "1", "--report-to", "tensorboard", "wandb", "none"]) == 0
    assert (out / "tensorboard").is_dir() and set(json.loads((out / "trackers.json").read_text())) == {"wandb"}
    assert json.loads((out / "args.json").read_text())["report_to"] == ["tensorboard", "wandb", "none"]
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "r"), *ARGS, "--report-to", "mlflow"])
    assert "invalid choice: 'mlflow'" in capsys.readouterr().err
