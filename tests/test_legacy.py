"""Files written by earlier versions (tests/data/legacy-v0, see its README) still load, and an old checkpoint
resumes to exactly what that version reached without the interruption."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minimoe
from minimoe.adapters.io import read_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

LEGACY = Path(__file__).parent / "data" / "legacy-v0"
BASES = {"epng": "epng-run", "esft": "epng-run", "lora": "epng-run", "dmep": "dmep-run"}


@pytest.mark.parametrize("policy", ["epng", "dmep"])
def test_an_old_checkpoint_resumes_to_the_old_uninterrupted_result(tmp_path, policy):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / f"{policy}-run", run)
    assert train.main(["--resume", str(run)]) == 0  # the saved arguments: 8 steps, tiny preset, ...
    got = load_file(str(run / "adapter" / "adapter.safetensors"))
    want = load_file(str(LEGACY / f"{policy}-adapter" / "adapter.safetensors"))
    want = {k: v for k, v in want.items() if not k.endswith(".counts")}  # kept by the statistics now
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("kind", ["epng", "dmep", "esft", "lora"])
def test_an_old_adapter_loads_and_saves_back_the_same_tensors(tmp_path, kind):
    directory = LEGACY / f"{kind}-adapter"
    model = minimoe.from_pretrained(LEGACY / BASES[kind] / "base")
    model.load_adapter(directory)  # the base fingerprint still matches
    minimoe.save_adapter(model, tmp_path / "again")
    _, old = read_adapter(directory)
    _, new = read_adapter(tmp_path / "again")
    old = {k: v for k, v in old.items() if not k.endswith(".counts")}
    assert new.keys() == old.keys()
    for k in old:
        assert torch.equal(new[k], old[k]), k
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    base = minimoe.from_pretrained(LEGACY / BASES[kind] / "base")
    assert not torch.allclose(model.eval()(ids).logits, base.eval()(ids).logits)  # the adapter is in effect
