"""Files written by earlier versions (tests/data/legacy-v0, see its README) still load, and an old checkpoint
resumes to what that version reached without the interruption.

The fixtures were written on one CPU; another CPU's kernels (AVX2 vs AVX-512 matmul and reduction paths) sum in
another order, so a resumed run is compared with the stored result within ``CROSS_CPU`` (observed: 1.5e-8 on an
AMD EPYC for a fixture written on an Intel CPU). What must hold bit for bit is checked on the machine that runs the
test: an old checkpoint resumed in one go and resumed in two legs (old format -> this version's checkpoint ->
the end) give identical tensors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minimoe
from minimoe.adapters.io import read_adapter

from minimoe.cli import train as train  # noqa: E402

LEGACY = Path(__file__).parent / "data" / "legacy-v0"
BASES = {"epng": "epng-run", "esft": "epng-run", "lora": "epng-run", "dmep": "dmep-run"}
# Stored tensors (|w| <= 0.2) vs the same run on another CPU: summation-order noise left 1.5e-8 after the last
# steps; one AdamW update in the resumed steps moves a weight by about the learning rate (5e-6 .. 6e-5), so a
# resume that restored the wrong moments, rows or data order is off by more than 1e-6, and the noise is 70x under.
CROSS_CPU = dict(rtol=0.0, atol=1e-6)


def _assert_close(got: dict, want: dict, **tol):
    assert got.keys() == want.keys()
    for k in want:
        if tol:
            torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("policy", ["epng", "dmep"])
def test_an_old_checkpoint_resumes_to_the_old_uninterrupted_result(tmp_path, policy):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / f"{policy}-run", run)
    assert train.main(["--resume", str(run)]) == 0  # the saved arguments: 8 steps, tiny preset, ...
    got = _adapter_tensors(run / "adapter")
    _assert_close(got, _adapter_tensors(LEGACY / f"{policy}-adapter"), **CROSS_CPU)  # the old version's result
    # on this CPU, bit for bit: the old checkpoint resumed in two legs, through a checkpoint of this version
    legs = tmp_path / "legs"
    shutil.copytree(LEGACY / f"{policy}-run", legs)
    assert train.main(["--resume", str(legs), "--stop-at", "6"]) == 0
    assert train.main(["--resume", str(legs)]) == 0
    _assert_close(_adapter_tensors(legs / "adapter"), got)


def test_an_old_checkpoint_before_the_prune_keeps_its_hard_counts(tmp_path):
    """Before the routing statistics were one object, LoRA-MoE counts were module buffers: a checkpoint
    taken during DMEP's exploration must hand them to the statistics, or the prune decides on too little."""
    run = tmp_path / "run"
    shutil.copytree(LEGACY / "dmep-explore-run", run)
    assert train.main(["--resume", str(run)]) == 0
    old = [json.loads(line) for line in (LEGACY / "dmep-adapter-events.jsonl").read_text().splitlines()]
    new = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    prune_old, prune_new = ([e for e in events if e["event"] == "dmep_prune"][0] for events in (old, new))
    # counts of whole top-k choices: another CPU's ~1e-8 noise (CROSS_CPU) moves a token from one expert to
    # another only where its k-th and (k+1)-th experts lie that close (none on the CPU that wrote the fixture, nor
    # on an AMD EPYC); allow FLIPS such moves per expert. No stored count lies within FLIPS of the threshold
    # τ·total, so such moves cannot change the survivors, which are compared exactly.
    flips = 2
    tau = json.loads((LEGACY / "dmep-explore-run" / "checkpoint" / "trainer.json").read_text())["args"][
        "policy_options"].get("tau", 0.1)
    assert prune_new["counts"].keys() == prune_old["counts"].keys()
    for name, want in prune_old["counts"].items():
        got = prune_new["counts"][name]
        assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) <= flips, name
        assert all(abs(c - tau * sum(want)) > flips for c in want), name  # (the fixture's margin: 3 at least)
    assert prune_new["survivors"] == prune_old["survivors"]
    assert any(len(s) < 4 for s in prune_old["survivors"].values())  # the counts decided something
    _assert_close(_adapter_tensors(run / "adapter"), _adapter_tensors(LEGACY / "dmep-adapter"), **CROSS_CPU)


def _adapter_tensors(directory):
    """An adapter's tensors, without the ``.counts`` that old adapters stored (the statistics keep them now)."""
    return {k: v for k, v in load_file(str(directory / "adapter.safetensors")).items() if not k.endswith(".counts")}


@pytest.mark.parametrize("kind", ["epng", "dmep", "esft", "lora"])
def test_an_old_adapter_loads_and_saves_back_the_same_tensors(tmp_path, kind):
    directory = LEGACY / f"{kind}-adapter"
    model = minimoe.from_pretrained(LEGACY / BASES[kind] / "base")
    model.load_adapter(directory)  # the base fingerprint still matches
    minimoe.save_adapter(model, tmp_path / "again")
    _, old = read_adapter(directory)
    _, new = read_adapter(tmp_path / "again")  # loaded and written back, no arithmetic: bit for bit on any CPU
    old = {k: v for k, v in old.items() if not k.endswith(".counts")}
    assert new.keys() == old.keys()
    for k in old:
        assert torch.equal(new[k], old[k]), k
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    base = minimoe.from_pretrained(LEGACY / BASES[kind] / "base")
    assert not torch.allclose(model.eval()(ids).logits, base.eval()(ids).logits)  # the adapter is in effect
