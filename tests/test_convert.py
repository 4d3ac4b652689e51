"""Converted checkpoints (``minimoe convert``): exact round trips for every family, a layout that
other tools refuse instead of misreading, and an existing destination refused before any work."""

import json
import re
import shutil

import pytest
import torch
from conftest import VARIANTS, save_fused
from safetensors import safe_open

import minimoe
import minimoe.tools.convert as convert_mod
from minimoe.tools.convert import convert, main
from minimoe.utils.files import DestinationExists
from minimoe.model.hf import CONVERTED_WEIGHTS

IDS = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def _assert_same_model(a, b, atol=1e-5):
    """Bit-identical weights (the exact claim). Logits only within ``atol``: the converted tensors are used
    memory-mapped where the file puts them, and CPU matmul kernels may round the last bit differently
    for inputs at another memory alignment (cloning them gives identical logits)."""
    assert a.tied == b.tied
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert (_logits(a).float() - _logits(b).float()).abs().max() < atol


def _snapshot(directory):
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_checkpoint_round_trip_is_exact(hf_checkpoint, variant, tmp_path):
    hf, directory = hf_checkpoint(variant)
    out = convert(str(directory), tmp_path / "conv")
    files = {f.name for f in out.iterdir()}
    assert CONVERTED_WEIGHTS in files and "config.json" in files and "model.safetensors" not in files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["minimoe_layout"] == 2 and cfg["architectures"] == ["MinimoeConverted"]
    assert cfg["minimoe_source_architectures"] == hf.config.architectures
    assert "minimoe.from_pretrained" in cfg["minimoe_note"]
    with safe_open(str(out / CONVERTED_WEIGHTS), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["layout"] == "minimoe"
    assert not [k for k in keys if k.startswith("model.") or re.search(r"experts\.\d+\.", k)]  # minimoe names
    if hf.config.model_type != "qwen3":  # MoE: one stacked tensor per projection and layer
        assert f"layers.{minimoe.from_pretrained(directory).config.moe_layers[0]}.mlp.experts.gate_proj.weight" in keys

    back = minimoe.from_pretrained(out)
    _assert_same_model(minimoe.from_pretrained(directory), back)
    with torch.no_grad():
        assert (hf(IDS).logits - _logits(back)).abs().max() < 1e-4  # and it is still the Hub model


@pytest.mark.parametrize("variant", ["olmoe", "qwen2_moe", "qwen3_moe"])
def test_convert_reads_the_fused_layout_too(hf_checkpoint, variant, tmp_path):
    hf, directory = hf_checkpoint(variant)
    out = convert(str(save_fused(hf, tmp_path / "fused")), tmp_path / "conv", dtype="bfloat16")
    back = minimoe.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(back.parameters()).dtype == torch.bfloat16
    _assert_same_model(minimoe.from_pretrained(directory, dtype=torch.bfloat16), back, atol=5e-2)  # bf16 ulps


@pytest.mark.parametrize("variant", ["olmoe", "qwen3-tied"])
def test_transformers_refuses_a_converted_checkpoint_instead_of_misreading_it(hf_checkpoint, variant, tmp_path):
    """Stacked expert keys under a Hub name would load in transformers with random experts (and only a
    warning); the converted layout has no file transformers reads, so it raises."""
    from transformers import AutoModelForCausalLM

    _, directory = hf_checkpoint(variant)
    out = convert(str(directory), tmp_path / "conv")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # the way back to the Hub layout is a plain export, which transformers reads again
    from minimoe.tools.export_adapter import main as export_main

    assert export_main(["--model", str(out), "--out", str(tmp_path / "hub")]) == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hub", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ref(IDS).logits - _logits(minimoe.from_pretrained(directory))).abs().max() < 1e-4


def test_older_converted_checkpoints_still_load(hf_checkpoint, tmp_path):
    """Layout 1 (before the rename): stacked keys in model.safetensors, the Hub architectures."""
    _, directory = hf_checkpoint("qwen2_moe-sparse")
    out = convert(str(directory), tmp_path / "v1")
    (out / CONVERTED_WEIGHTS).rename(out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(minimoe_layout=1, architectures=cfg.pop("minimoe_source_architectures"))
    del cfg["minimoe_note"]
    (out / "config.json").write_text(json.dumps(cfg))
    _assert_same_model(minimoe.from_pretrained(directory), minimoe.from_pretrained(out))


def test_existing_destination_is_refused_before_loading_and_left_as_it_was(hf_checkpoint, tmp_path, monkeypatch,
                                                                            capsys):
    _, directory = hf_checkpoint("olmoe")
    dst = convert(str(directory), tmp_path / "conv")
    (dst / "notes.txt").write_text("mine")
    before = _snapshot(dst)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(convert_mod, "from_pretrained", no_loading)
    monkeypatch.setattr(convert_mod, "resolve", no_loading)
    with pytest.raises(DestinationExists, match=f"{dst} already exists; pass --overwrite"):
        convert(str(directory), dst)
    assert main([str(directory), str(dst)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"error: {dst} already exists; pass --overwrite" in captured.err
    assert _snapshot(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]  # no temporary directory left behind

    monkeypatch.undo()
    assert main([str(directory), str(dst), "--overwrite"]) == 0
    assert "notes.txt" not in {f.name for f in dst.iterdir()}
    _assert_same_model(minimoe.from_pretrained(directory), minimoe.from_pretrained(dst))


def test_convert_cli_default_destination_and_bad_source(hf_checkpoint, tmp_path, monkeypatch, capsys):
    _, directory = hf_checkpoint("qwen3-tied")
    src = shutil.copytree(directory, tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    assert main([str(src)]) == 0
    assert capsys.readouterr().out.strip() == "wrote weights/my-model-minimoe"
    _assert_same_model(minimoe.from_pretrained(src), minimoe.from_pretrained(tmp_path / "weights/my-model-minimoe"))
    assert main([str(tmp_path / "absent"), str(tmp_path / "x")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "is not a local directory" in captured.err and not (tmp_path / "x").exists()
