"""``minimoe reproduce`` never replaces earlier runs without ``--overwrite`` (train.py is faked)."""

import json
import subprocess
from pathlib import Path

import pytest

from minimoe.tools import reproduce, runs


def _summary(policy, seed):
    return {"task_score_before": 0.01, "task_score_after": 0.5 + seed / 10, "trainable_parameters": 1000,
            "tokens_per_s": 100.0, "policy": policy}


def _finished_run(out, policy, seed, steps):
    out.mkdir(parents=True)
    model = "weights/tiny-dense" if policy == "dmep" else "weights/tiny-moe"
    options = {"dense_targets": []} if policy == "lora" else {"prune_step": 0} if policy == "dmep" else {}
    (out / "args.json").write_text(json.dumps({"policy": policy, "seed": seed, "steps": steps, "model": model,
                                               "data": "tiny-arith", "eval_limit": 100, "policy_options": options}))
    (out / "summary.json").write_text(json.dumps(_summary(policy, seed)))


def _snapshot(directory):
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


@pytest.fixture
def calls(monkeypatch):
    """Replace train.py's subprocess: record each command and write what a finished run writes."""
    made = []

    def fake_run(cmd, **kwargs):
        made.append(cmd)
        arg = dict(zip(cmd, cmd[1:]))
        out = Path(arg["--out"])
        if out.exists() and any(out.iterdir()) and "--overwrite" not in cmd:
            return subprocess.CompletedProcess(cmd, 1, "", "run directory exists")  # what train.py does
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(_summary(arg["--policy"], int(arg["--seed"]))))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(runs.subprocess, "run", fake_run)
    return made


def test_existing_runs_are_refused_before_anything_runs(tmp_path, calls, capsys):
    root = tmp_path / "rep"
    (root / "epng-seed1").mkdir(parents=True)
    (root / "epng-seed1" / "log.jsonl").write_text("earlier run\n")
    _finished_run(root / "lora-seed0", "lora", 0, steps=50)  # finished, but with other steps
    (root / "lora-seed1").mkdir()  # empty: train.py writes into it without --overwrite
    before = _snapshot(root)
    argv = ["--seeds", "2", "--policies", "lora", "epng", "--steps", "300", "--out", str(root)]
    assert reproduce.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{root / 'lora-seed0'}, {root / 'epng-seed1'}" in err and "lora-seed1" not in err
    assert "pass --overwrite to replace them, or --reuse to keep finished runs (nothing was run)" in err
    assert calls == [] and _snapshot(root) == before
    assert reproduce.main([*argv, "--reuse"]) == 2  # --reuse cannot keep a run with other steps
    assert "that --reuse cannot keep" in capsys.readouterr().err
    assert calls == [] and _snapshot(root) == before and not (root / "table.md").exists()


def test_reuse_keeps_finished_runs_and_runs_the_rest_without_overwrite(tmp_path, calls):
    root = tmp_path / "rep"
    _finished_run(root / "lora-seed0", "lora", 0, steps=300)
    before = _snapshot(root / "lora-seed0")
    assert reproduce.main(["--seeds", "1", "--policies", "lora", "esft", "--out", str(root), "--reuse"]) == 0
    assert [c[c.index("--policy") + 1] for c in calls] == ["esft"] and all("--overwrite" not in c for c in calls)
    assert _snapshot(root / "lora-seed0") == before
    table = (root / "table.md").read_text()
    assert "| lora | 1,000 |" in table and "| esft | 1,000 |" in table
    assert not [p.name for p in root.iterdir() if ".tmp-" in p.name]


def test_overwrite_replaces_existing_runs_only_when_asked(tmp_path, calls):
    root = tmp_path / "rep"
    _finished_run(root / "dmep-seed0", "dmep", 0, steps=300)
    assert reproduce.main(["--seeds", "1", "--policies", "dmep", "--out", str(root), "--overwrite"]) == 0
    assert len(calls) == 1 and "--overwrite" in calls[0]
    assert "| dmep | 1,000 | 100 | – | 0.500 ± 0.000 | 1 |" in (root / "table.md").read_text()


def test_dmep_rows_run_the_papers_three_methods_on_the_dense_model(tmp_path, calls):
    root = tmp_path / "rep"
    assert reproduce.main(["--seeds", "1", "--rows", "dense-lora", "lora-moe", "dmep", "--steps", "40",
                           "--out", str(root)]) == 0
    dense, moe, dmep = (dict(zip(c, c[1:])) for c in calls)
    assert [a["--policy"] for a in (dense, moe, dmep)] == ["lora", "dmep", "dmep"]
    assert all(a["--model"] == "tiny-dense" for a in (dense, moe, dmep))
    targets = calls[0][calls[0].index("--lora-dense-targets") + 1:][:7]
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert moe["--dmep-prune-step"] == "-1" and dmep["--dmep-prune-step"] == "0"  # symmetric: never pruned
    assert all(a["--data"] == "tiny-arith" and a["--eval-limit"] == "100" for a in (dense, moe, dmep))
    assert "**DMEP" in (root / "table.md").read_text() and "**EPnG" not in (root / "table.md").read_text()
