"""Fault injection, as a hostile or an unlucky user would: every case here failed before (issue: hardening).
Each test names what it reproduces."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
from minimoe.cli import train as train  # noqa: E402

TINY = ["--model", "tiny-olmoe", "--batch-size", "2", "--eval-limit", "0"]


class _Exploit:
    """What a crafted state.pt holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """An epng run stopped at step 2 of 4 (a checkpoint to resume)."""
    out = tmp_path_factory.mktemp("hardening") / "run"
    assert train.main(["--policy", "epng", *TINY, "--steps", "4", "--stop-at", "2", "--out", str(out)]) == 0
    return out


def _copy(run, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("file", ["state.pt", "optimizer.pt"])
def test_a_crafted_checkpoint_runs_no_code_on_resume(stopped_run, tmp_path, capsys, file):
    """1. --resume used torch.load(weights_only=False): a state.pt whose object reduces to os.system ran it."""
    run = _copy(stopped_run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"policy": _Exploit(marker)}, run / "checkpoint" / file)
    assert train.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint' / file} is not a checkpoint minimoe wrote: it asks to run code" in err
    assert "system" in err and not marker.exists()


def test_a_torn_last_log_line_is_dropped_and_other_bad_lines_are_named(stopped_run, tmp_path, capsys):
    """3. After a disk-full during an append, events.jsonl ended with half a line and --resume failed with
    "Expecting ':' delimiter", naming no file."""
    run = _copy(stopped_run, tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 1.2, "lr')  # the append that was cut short
    assert train.main(["--resume", str(run)]) == 0
    assert f"{run / 'metrics.jsonl'}: dropped an incomplete last line" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    damaged = _copy(stopped_run, tmp_path, "damaged")
    lines = (damaged / "metrics.jsonl").read_text().splitlines()
    (damaged / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    assert train.main(["--resume", str(damaged)]) == 2
    assert f"{damaged / 'metrics.jsonl'}:2: not a log record" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so_and_changes_nothing(stopped_run, tmp_path, capsys):
    """4. --resume on a completed run rewrote summary.json with final_loss null and crashed."""
    run = _copy(stopped_run, tmp_path)
    assert train.main(["--resume", str(run)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert train.main(["--resume", str(run)]) == 2
    assert f"{run} finished at step 4; to train longer pass --steps M with M > 4" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_run_killed_after_its_last_checkpoint_finishes_its_export_on_resume(stopped_run, tmp_path):
    """4. The same after a kill between the final checkpoint and the export."""
    run = _copy(stopped_run, tmp_path)
    assert train.main(["--resume", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    assert train.main(["--resume", str(run)]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert (run / "adapter" / "adapter.safetensors").is_file()
    assert again["final_loss"] == summary["final_loss"] and again["steps"] == 4


def test_a_longer_schedule_on_resume_is_announced_and_empty_events_are_not_logged(stopped_run, tmp_path, capsys):
    """5. --resume --steps M silently restarted the schedule; events that changed nothing were logged."""
    run = _copy(stopped_run, tmp_path)
    assert train.main(["--resume", str(run), "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "--steps 6 (was 4): the learning rate goes from 5e-05 to 6.67e-05 at step 3, then follows the linear " \
           "schedule of a 6-step run with peak 0.0001" in out
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    schedule = [e for e in events if e["event"] == "schedule"]
    assert len(schedule) == 1 and schedule[0]["step"] == 2 and schedule[0]["steps"] == 6
    assert schedule[0]["lr_after"] == json.loads((run / "metrics.jsonl").read_text().splitlines()[2])["lr"]
    # an EPnG event time with too few adapted experts to prune or grow any is not an event
    small = tmp_path / "small"
    assert train.main(["--policy", "epng", *TINY, "--steps", "6", "--epng-warmup", "2", "--epng-interval", "1",
                       "--epng-alpha", "0.05", "--epng-beta", "0.05", "--out", str(small)]) == 0
    assert all(e["pruned"] or e["grown"] for e in map(json.loads, (small / "events.jsonl").read_text().splitlines())
               if e["event"] == "prune_grow")
    assert json.loads((small / "summary.json").read_text())["events"] == 2  # the importance probes only


def test_stale_temporaries_are_removed_on_resume(stopped_run, tmp_path, capsys):
    """7. kill -9 during a save left .checkpoint.tmp-* directories forever."""
    run = _copy(stopped_run, tmp_path)
    stale = run / ".checkpoint.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    assert train.main(["--resume", str(run)]) == 0
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().out


def test_divergence_stops_the_run_and_nothing_non_finite_is_saved(tmp_path, capsys):
    """6. --lr 1e3 finished with rc 0 and weights ~4.6e3, every save overwriting the checkpoint; with --lr 1e30
    --max-grad-norm 0 the "last good checkpoint" held weights ~1e30; --lr 1e38 crashed inside Adam."""
    run = tmp_path / "diverging"
    rc = train.main(["--policy", "full", "--lr", "1", "--steps", "30", "--warmup-ratio", "0", "--save-every", "1",
                     "--batch-size", "8", "--eval-limit", "0", "--out", str(run)])  # the shipped tiny model
    err = capsys.readouterr().err
    assert rc == 1 and "the loss diverged:" in err and "above 1.5 x its running median" in err
    step = json.loads((run / "checkpoint" / "trainer.json").read_text())["step"]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert step == 1 and losses[1] > 1.5 * losses[0]  # nothing was checkpointed once the loss rose
    last = json.loads((run / "events.jsonl").read_text().splitlines()[-1])  # an event (trackers show it too)
    assert last["event"] == "divergence" and last["step"] == len(losses) and last["loss"] == losses[-1]
    assert last["median"] == losses[0] and last["streak"] == 10
    assert not (run / "summary.json").exists()
    for lr, extra, said in (("1e30", ["--max-grad-norm", "0"], "non-finite weights after the optimizer step 1"),
                            ("1e38", [], "non-finite optimizer step")):
        out = tmp_path / f"lr{lr}"
        assert train.main(["--policy", "lora", *TINY, "--steps", "4", "--lr", lr, *extra, "--save-every", "1",
                           "--out", str(out)]) == 1
        assert said in capsys.readouterr().err
        assert not (out / "checkpoint").exists()  # nothing non-finite was ever written


def test_a_checkpoint_is_never_written_with_non_finite_optimizer_state(tmp_path):
    """6. The save itself refuses: weights can be finite while a moment is not (the next step would spread it)."""
    from minimoe.train.trainer import TrainConfig, Trainer, TrainingError

    trainer = Trainer(TrainConfig(policy="lora", model="tiny-olmoe", out=str(tmp_path / "r"), steps=4, batch_size=2,
                                  eval_limit=0), show_progress=False).setup()
    trainer.train_step()
    trainer.save()
    before = (tmp_path / "r" / "checkpoint" / "optimizer.pt").read_bytes()
    next(iter(trainer.optimizer.state.values()))["exp_avg_sq"].view(-1)[0] = float("inf")
    with pytest.raises(TrainingError, match="non-finite weights or optimizer state at step 1: not saved"):
        trainer.save()
    assert (tmp_path / "r" / "checkpoint" / "optimizer.pt").read_bytes() == before


@pytest.mark.parametrize("line, message", [
    ('{"prompt": 123, "response": "x"}', "field 'prompt' must be a string, got int 123"),
    ('{"prompt": "q", "response": ["a", "b"]}', "field 'response' must be a string, got list [\"a\", \"b\"]"),
    ('{"question": null, "answer": "4"}', "field 'question' must be a string, got NoneType null"),
    ('{"prompt": "q", "response": NaN}', "NaN is not JSON"),
    ('{"prompt": "q", "response": Infinity}', "Infinity is not JSON"),
    ('{"prompt": "\\ud800", "response": "x"}', "field 'prompt' holds an invalid character (surrogates not allowed"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}',
     "messages[1] must be an object with 'role' and 'content'"),
    ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
     "messages[0] has role 'wizard'; roles: system, user, assistant, tool"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "'messages' must end with an assistant turn"),
])
def test_bad_training_data_is_refused_naming_file_line_and_field(tmp_path, capsys, line, message):
    """9. Wrong types were trained on silently (123 -> "123", null -> "None"), NaN accepted, a lone surrogate
    gave a traceback, malformed chat turns passed."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "fine", "response": "ok"}\n' + line + "\n")
    assert train.main(["--policy", "lora", *TINY, "--steps", "1", "--data", str(data),
                       "--out", str(tmp_path / "r")]) == 2
    assert f"error: {data}:2: " in (err := capsys.readouterr().err) and message in err, err


def test_non_utf8_bytes_too_long_sequences_and_empty_responses(tmp_path, capsys):
    """9. Non-UTF-8 bytes gave a traceback; --max-len beyond the model's positions trained silently; empty
    responses went unreported."""
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "ok", "response": "fine"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    assert train.main(["--policy", "lora", *TINY, "--steps", "1", "--data", str(data),
                       "--out", str(tmp_path / "r")]) == 2
    assert f"error: {data}:2: not UTF-8 (byte 0xe9 at column 16)" in capsys.readouterr().err
    assert train.main(["--policy", "lora", *TINY, "--steps", "1", "--max-len", "4096",
                       "--out", str(tmp_path / "r")]) == 2
    assert "--max-len 4096 is above the model's max_position_embeddings (512); pass --max-len 512 or less" \
        in capsys.readouterr().err
    data = tmp_path / "empty.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": ""}\n{"prompt": "d", '
                    '"response": "  "}\n')
    assert train.main(["--policy", "lora", *TINY, "--steps", "1", "--data", str(data),
                       "--out", str(tmp_path / "e")]) == 0
    assert "2 of 3 examples have an empty response" in capsys.readouterr().out


def test_toml_values_are_checked_and_a_run_writes_a_config_that_repeats_it(tmp_path, capsys):
    """10. steps = "ten" gave a traceback, tau = "x" crashed only at the prune; 12. args.json stored
    policy_options {} (the settings used were not recorded)."""
    for text, message in (('[train]\nsteps = "ten"\n', "steps = 'ten': expected an integer"),
                          ('[dmep]\ntau = "x"\n', "[dmep] tau = 'x': expected a number"),
                          ('[train]\nbatch_size = 0\n', "batch_size = 0: must be at least 1"),
                          ('[train]\nwarmup_ratio = 2.0\n', "warmup_ratio = 2.0: must be in 0.0..1.0"),
                          ('[train]\npacking = 1\n', "packing = 1: expected true or false"),
                          ('[epng]\ntargets = "gate_proj"\n', "[epng] targets = 'gate_proj': expected a list")):
        toml = tmp_path / "bad.toml"
        toml.write_text(("policy = \"dmep\"\n" if "dmep" in text else "") + text)
        with pytest.raises(SystemExit):
            train.resolve(["--config", str(toml)])
        assert message in capsys.readouterr().err
    run = tmp_path / "run"
    assert train.main(["--policy", "esft", *TINY, "--steps", "2", "--esft-sample-batches", "1",
                       "--out", str(run)]) == 0
    args = json.loads((run / "args.json").read_text())
    assert args["policy_options"] == {"score": "token", "top_p": 0.2, "normalize": "global", "sample_batches": 1,
                                      "shared": False, "targets": ["gate_proj", "up_proj", "down_proj"]}  # 0 -> 0.2
    again = train.resolve(["--config", str(run / "config.toml")])
    first = train.resolve(["--policy", "esft", *TINY, "--steps", "2", "--esft-sample-batches", "1",
                           "--out", str(run)])
    assert again.policy_options == {**first.policy_options, "score": "token", "top_p": 0.2, "normalize": "global",
                                    "shared": False, "targets": ("gate_proj", "up_proj", "down_proj")}
    assert {k: v for k, v in vars(again).items() if k != "policy_options"} == \
        {k: v for k, v in vars(first).items() if k != "policy_options"}


def test_an_unwritable_run_directory_is_a_one_line_error(tmp_path, capsys):
    """8. Disk full and read-only directories gave raw tracebacks (SafetensorError, OSError). A failed write of a
    checkpoint or an export, with the last checkpoint kept: test_write_errors.py (real failures, not mocked)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert train.main(["--policy", "lora", *TINY, "--steps", "1", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write {blocker / 'run'}: Not a directory" in err and "Traceback" not in err


def test_output_that_is_not_a_terminal_gets_plain_progress_lines_not_bar_frames(tmp_path, capsys):
    argv = ["--policy", "lora", "--model", "tiny-olmoe", "--steps", "12", "--batch-size", "2", "--eval-limit", "0",
            "--out", str(tmp_path / "r")]
    assert train.main(argv) == 0  # capsys: neither stream is a terminal, as in a cluster's log file
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["10/12", "12/12"]  # every 10 steps, and the last
    assert "loss" in lines[0] and "tokens/s" in lines[0] and "\r" not in out + err
    assert train.main([*argv[:-2], "--out", str(tmp_path / "s"), "--log-every", "4"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")] == \
        ["4/12", "8/12", "12/12"]
