"""Fault injection, as a hostile or an unlucky user would: every case here failed before (issue: hardening).
Each test names what it reproduces."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

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
