"""Files written by earlier versions (tests/data/legacy-v0, see its README) still load, and an old checkpoint
resumes to exactly what that version reached without the interruption."""

import json
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


def test_an_old_checkpoint_before_the_prune_keeps_its_hard_counts(tmp_path):
    """Before the routing statistics were one object, LoRA-MoE counts were module buffers: a checkpoint
    taken during DMEP's exploration must hand them to the statistics, or the prune decides on too little."""
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "dmep-explore-run", run)
    assert train.main(["--resume", str(run)]) == 0
    old = [json.loads(line) for line in (LEGACY / "dmep-adapter-events.jsonl").read_text().splitlines()]
    new = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    prune_old, prune_new = ([e for e in events if e["event"] == "dmep_prune"][0] for events in (old, new))
    assert prune_new["counts"] == prune_old["counts"] and prune_new["survivors"] == prune_old["survivors"]
    assert any(len(s) < 4 for s in prune_old["survivors"].values())  # the counts decided something
    got, want = _adapter_tensors(run / "adapter"), _adapter_tensors(LEGACY / "dmep-adapter")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _adapter_tensors(directory):
    return {k: v for k, v in load_file(str(directory / "adapter.safetensors")).items() if not k.endswith(".counts")}


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
