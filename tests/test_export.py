"""Artefacts in and out: adapters, merged exports (transformers) and PEFT adapters (converted checkpoints:
test_convert.py)."""

import json

import pytest
import torch

import minimoe
from minimoe.adapters.io import AdapterError
from minimoe.utils.files import DestinationExists

IDS = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(0))


def _randomize_adapters(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(ids).logits


def _adapter_copy(path, dst, cfg: dict):
    """The adapter at ``path`` copied to ``dst`` with ``cfg`` as its adapter_config.json."""
    dst.mkdir()
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    (dst / "adapter.safetensors").write_bytes((path / "adapter.safetensors").read_bytes())
    return dst


def _epng_like(directory, targets=("gate_proj", "up_proj"), dense=()):
    """A loaded base with expert LoRA resized like EPnG events (grown, pruned, shrunk) and trained."""
    model = minimoe.from_pretrained(directory)
    model.add_expert_lora(rank=4, alpha=8, targets=targets)
    layer = model.config.moe_layers[0]
    model.grow_expert_lora({layer: {1: 4, 2: 2}}, generator=torch.Generator().manual_seed(1))
    model.prune_expert_lora({layer: [5]})
    model.shrink_expert_lora({layer: {2: 1}})
    if dense:
        model.add_lora(rank=3, alpha=6, targets=dense)
    _randomize_adapters(model)
    return model


@pytest.mark.parametrize("variant", ["olmoe", "qwen2_moe", "qwen3_moe"])
def test_adapter_round_trip_after_epng_events(hf_checkpoint, variant, tmp_path):
    _, directory = hf_checkpoint(variant)
    model = _epng_like(directory, targets=("gate_proj", "up_proj", "down_proj"), dense=("q_proj",))
    path = minimoe.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["kinds"] == ["expert_lora", "lora"] and cfg["base_model"] == str(directory)
    layer = model.config.moe_layers[0]
    assert cfg["expert_lora"][f"layers.{layer}.mlp.experts.up_proj"]["ranks"] == [4, 8, 5, 4, 4, 0, 4, 4]
    back = minimoe.from_pretrained(directory).load_adapter(path)
    assert torch.equal(_logits(back), _logits(model))
    assert back.num_adapter_parameters() == model.num_adapter_parameters()
    assert {k: v.tolist() for k, v in back.expert_lora_ranks().items()} == \
        {k: v.tolist() for k, v in model.expert_lora_ranks().items()}


def test_adapter_round_trip_after_dmep_pruning(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("qwen3-tied")
    model = minimoe.from_pretrained(directory)
    model.add_lora_moe(num_experts=6, top_k=2, rank=4, alpha=8, targets=("q_proj", "down_proj"))
    _randomize_adapters(model)
    model.prune_lora_moe({"layers.0.self_attn.q_proj": [1, 4], "layers.1.mlp.down_proj": [0, 2, 5]})
    for m in model.lora_moe_modules().values():
        m.lb_enabled = False
    path = minimoe.save_adapter(model, tmp_path / "dmep")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["lora_moe"]["layers.1.mlp.down_proj"]["expert_ids"] == [0, 2, 5]
    back = minimoe.from_pretrained(directory).load_adapter(path)
    assert torch.equal(_logits(back), _logits(model))
    q = back.lora_moe_modules()["layers.0.self_attn.q_proj"]
    assert q.expert_ids.tolist() == [1, 4] and q.top_k == 2 and not q.lb_enabled


def _hf_logits(directory):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(IDS).logits


@pytest.mark.parametrize("variant,dense", [("olmoe", ("q_proj", "o_proj")),
                                           ("qwen2_moe", ("gate_proj", "up_proj", "down_proj", "v_proj")),
                                           ("qwen3_moe", ("k_proj",))])
def test_merged_export_loads_in_transformers(hf_checkpoint, variant, dense, tmp_path):
    _, directory = hf_checkpoint(variant)
    model = _epng_like(directory, targets=("gate_proj", "up_proj", "down_proj"), dense=dense)
    if variant == "qwen2_moe":  # the dense targets landed on the shared expert
        assert "layers.0.mlp.shared_expert.gate_proj" in [n for n, m in model.named_modules()
                                                           if isinstance(m, minimoe.LoRALinear)]
    out = minimoe.export_merged(model, tmp_path / "merged")
    assert (out / "generation_config.json").is_file()
    assert (_hf_logits(out) - _logits(model)).abs().max() < 1e-4
    assert (_hf_logits(out) - _logits(minimoe.from_pretrained(directory))).abs().max() > 1e-3  # it changed


def test_merged_export_dense_qwen3_tied(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("qwen3-tied")
    model = minimoe.from_pretrained(directory)
    model.add_lora(rank=4, alpha=8, targets=("q_proj", "v_proj", "gate_proj", "down_proj"))
    _randomize_adapters(model)
    out = minimoe.export_merged(model, tmp_path / "merged")
    assert (_hf_logits(out) - _logits(model)).abs().max() < 1e-4


@pytest.mark.parametrize("policy", ["esft", "full"])
def test_merged_export_of_esft_and_full_fine_tuning(hf_checkpoint, policy, tmp_path):
    from minimoe.policies.esft import SelectedExperts

    _, directory = hf_checkpoint("olmoe")
    model = minimoe.from_pretrained(directory)
    if policy == "esft":
        model.requires_grad_(False)  # only the selected experts change, as in ESFT training
        for t in ("gate_proj", "up_proj", "down_proj"):
            block = model.layers[1].mlp.experts
            setattr(block, t, SelectedExperts(getattr(block, t), [0, 3]))
    else:
        model.requires_grad_(True)
    _randomize_adapters(model)
    out = minimoe.export_merged(model, tmp_path / policy)
    assert (_hf_logits(out) - _logits(model)).abs().max() < 1e-4
    assert (_hf_logits(out) - _logits(minimoe.from_pretrained(directory))).abs().max() > 1e-3  # it changed


def test_lora_moe_cannot_be_merged_and_says_why(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("qwen3-tied")
    model = minimoe.from_pretrained(directory)
    model.add_lora_moe(num_experts=4, top_k=2, rank=2, targets=("q_proj",))
    with pytest.raises(AdapterError, match="cannot be merged.*minimoe.save_adapter"):
        minimoe.export_merged(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(AdapterError, match="PEFT cannot represent layers.0.self_attn.q_proj"):
        minimoe.export_peft(model, tmp_path / "p")


@pytest.mark.parametrize("variant,targets,dense", [
    ("olmoe", ("gate_proj", "up_proj"), ("q_proj",)),
    ("olmoe", ("gate_proj", "up_proj", "down_proj"), ()),
    ("qwen2_moe", ("up_proj", "down_proj"), ("gate_proj",)),  # dense gate_proj = the shared expert
    ("qwen3_moe", ("gate_proj", "up_proj", "down_proj"), ("o_proj", "v_proj")),
])
def test_peft_export_loads_in_peft_with_equal_logits(hf_checkpoint, variant, targets, dense, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, directory = hf_checkpoint(variant)
    model = _epng_like(directory, targets=targets, dense=dense)
    out = minimoe.export_peft(model, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"]
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = peft_model(IDS).logits
    assert (got - _logits(model)).abs().max() < 1e-4
    assert (got - _logits(minimoe.from_pretrained(directory))).abs().max() > 1e-3


def test_wrong_base_shape_mismatch_truncated_file_and_existing_destination(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("olmoe")
    model = _epng_like(directory)
    path = minimoe.save_adapter(model, tmp_path / "a")
    _, other = hf_checkpoint("qwen3_moe")
    with pytest.raises(AdapterError, match=r"was saved on base .*olmoe.*this model is .*qwen3_moe"):
        minimoe.from_pretrained(other).load_adapter(path)
    # a different base of the same architecture is caught by the weight fingerprint
    _, clip = hf_checkpoint("olmoe-clip")
    with pytest.raises(AdapterError, match="fingerprint"):
        minimoe.from_pretrained(clip).load_adapter(path)

    cfg = json.loads((path / "adapter_config.json").read_text())
    spec = cfg["expert_lora"]["layers.0.mlp.experts.gate_proj"]
    spec["chunks"] = [[r] if r else [] for r in spec["ranks"]]  # as files recorded them before rows were flat
    spec["ranks"][0] = 6
    inconsistent = _adapter_copy(path, tmp_path / "inconsistent", cfg)  # ranks edited, chunks not
    with pytest.raises(AdapterError, match=r"gate_proj chunks \[\[4\], .* do not add up to the ranks \[6, "):
        minimoe.from_pretrained(directory).load_adapter(inconsistent)
    cfg["expert_lora"]["layers.0.mlp.experts.gate_proj"]["chunks"][0] = [6]
    bad = _adapter_copy(path, tmp_path / "bad", cfg)
    with pytest.raises(AdapterError, match=r"disagrees with its adapter_config.json.*lora_A.0: \(4, 64\) in the file, \(6, 64\)"):
        minimoe.from_pretrained(directory).load_adapter(bad)

    data = (path / "adapter.safetensors").read_bytes()
    (bad / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    (bad / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=f"cannot read {bad / 'adapter.safetensors'}"):
        minimoe.from_pretrained(directory).load_adapter(bad)

    before = {f.name: f.read_bytes() for f in path.iterdir()}
    with pytest.raises(DestinationExists, match="already exists; pass overwrite=True"):
        minimoe.save_adapter(model, path)
    with pytest.raises(DestinationExists):
        minimoe.export_merged(model, path)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-written directory left
    minimoe.save_adapter(model, path, overwrite=True)


def test_export_cli_merges_an_adapter(hf_checkpoint, tmp_path, capsys):
    from minimoe.tools.export_adapter import main

    _, directory = hf_checkpoint("olmoe")
    model = _epng_like(directory)
    minimoe.save_adapter(model, tmp_path / "ad")
    assert main(["--model", str(directory), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 0
    assert (_hf_logits(tmp_path / "m") - _logits(model)).abs().max() < 1e-4
    assert main(["--model", str(directory), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 2
    captured = capsys.readouterr()
    assert "already exists; pass --overwrite" in captured.err and "error" not in captured.out
    # without --model the base is the one the adapter records
    assert main(["--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m2")]) == 0
    assert (_hf_logits(tmp_path / "m2") - _logits(model)).abs().max() < 1e-4


def test_fingerprint_agrees_across_dtypes_and_a_failed_load_changes_nothing(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("olmoe")
    model = _epng_like(directory)
    path = minimoe.save_adapter(model, tmp_path / "a")
    # a bf16 load of the same checkpoint is the same base (train in bf16 on a GPU, evaluate in fp32)
    bf16 = minimoe.from_pretrained(directory, dtype=torch.bfloat16).load_adapter(path)
    assert bf16.num_adapter_parameters() == model.num_adapter_parameters()
    # ... but permuting one expert's rows is another base
    other = minimoe.from_pretrained(directory)
    with torch.no_grad():
        w = other.layers[0].mlp.experts.gate_proj.weight
        w[0] = w[0].flip(0)
    with pytest.raises(AdapterError, match="fingerprint"):
        other.load_adapter(path)

    # every check runs before the model changes: a bad file leaves a plain, still-usable base
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["expert_lora"]["layers.1.mlp.experts.up_proj"]["ranks"][3] = 7
    bad = _adapter_copy(path, tmp_path / "bad", cfg)
    base = minimoe.from_pretrained(directory)
    with pytest.raises(AdapterError, match="disagrees with its adapter_config.json"):
        base.load_adapter(bad)
    assert base.num_adapter_parameters() == 0
    assert base.load_adapter(path).num_adapter_parameters() == model.num_adapter_parameters()
    with pytest.raises(AdapterError, match="already has an adapter"):
        base.load_adapter(path)

    # an entry without its fields is named, not a KeyError
    del cfg["expert_lora"]["layers.1.mlp.experts.up_proj"]["ranks"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"expert_lora entry 'layers.1.mlp.experts.up_proj' lacks \['ranks'\]"):
        minimoe.from_pretrained(directory).load_adapter(bad)


def test_export_cli_no_check_base(hf_checkpoint, tmp_path, capsys):
    from minimoe.tools.export_adapter import main

    _, directory = hf_checkpoint("olmoe")
    _, clip = hf_checkpoint("olmoe-clip")
    minimoe.save_adapter(_epng_like(directory), tmp_path / "ad")
    assert main(["--model", str(clip), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 2
    assert "fingerprint" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main(["--model", str(clip), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m"),
                 "--no-check-base"]) == 0
    assert (tmp_path / "m" / "config.json").exists()


def _snapshot(directory):
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


def _peft_logits(directory, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(adapter)).eval()(IDS).logits


def test_exports_refuse_an_existing_destination_before_building_anything(hf_checkpoint, tmp_path, monkeypatch,
                                                                         capsys):
    import minimoe.tools.export_adapter as export_mod
    import minimoe.model.hf as hf_mod

    _, directory = hf_checkpoint("olmoe")
    model = _epng_like(directory)
    ad = minimoe.save_adapter(model, tmp_path / "ad")
    dst = minimoe.export_peft(model, tmp_path / "peft")
    (dst / "notes.txt").write_text("mine")
    before = _snapshot(dst)

    def not_now(*args, **kwargs):
        raise AssertionError("work started before the destination was checked")

    for name in ("peft_tensors", "merged_state_dict"):
        monkeypatch.setattr(export_mod, name, not_now)
    monkeypatch.setattr(hf_mod, "from_pretrained", not_now)  # what the CLI loads the base with
    with pytest.raises(DestinationExists, match=f"{dst} already exists; pass overwrite=True"):
        minimoe.export_peft(model, dst)
    with pytest.raises(DestinationExists, match=f"{dst} already exists"):
        minimoe.export_merged(model, dst)
    for flag in ([], ["--peft"]):
        assert export_mod.main(["--adapter", str(ad), "--out", str(dst), *flag]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.strip() == \
            f"error: {dst} already exists; pass --overwrite to replace it (nothing was written)"
    assert _snapshot(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "peft"]  # no temporary directory left

    monkeypatch.undo()
    minimoe.export_peft(model, dst, overwrite=True)
    assert "notes.txt" not in {f.name for f in dst.iterdir()}
    assert (_peft_logits(directory, dst) - _logits(model)).abs().max() < 1e-4


def test_export_cli_peft_end_to_end(hf_checkpoint, tmp_path, capsys):
    from minimoe.tools.export_adapter import main

    _, directory = hf_checkpoint("qwen3_moe")
    model = _epng_like(directory, targets=("gate_proj", "up_proj", "down_proj"), dense=("q_proj",))
    minimoe.save_adapter(model, tmp_path / "ad")
    assert main(["--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "peft"), "--peft"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote PEFT adapter to {tmp_path / 'peft'}"
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(directory) and cfg["target_modules"]
    got = _peft_logits(directory, tmp_path / "peft")
    assert (got - _logits(model)).abs().max() < 1e-4
    assert (got - _logits(minimoe.from_pretrained(directory))).abs().max() > 1e-3  # the adapter is in it


@pytest.mark.parametrize("variant", ["qwen3-tied", "qwen3-untied"])
def test_peft_export_of_dense_lora_on_qwen3(hf_checkpoint, variant, tmp_path):
    _, directory = hf_checkpoint(variant)
    model = minimoe.from_pretrained(directory)
    model.add_lora(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"))
    _randomize_adapters(model)
    out = minimoe.export_peft(model, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_parameters"] is None and len(cfg["target_modules"]) == 14
    got = _peft_logits(directory, out)
    assert (got - _logits(model)).abs().max() < 1e-4
    assert (got - _logits(minimoe.from_pretrained(directory))).abs().max() > 1e-3


def test_esft_adapter_round_trip(hf_checkpoint, tmp_path):
    from minimoe.policies.esft import SelectedExperts

    _, directory = hf_checkpoint("qwen2_moe")
    model = minimoe.from_pretrained(directory).requires_grad_(False)  # the base stays as loaded
    chosen = {0: {"gate_proj": [1, 6], "down_proj": [2]}, 1: {"up_proj": [0, 3, 7]}}
    for layer, targets in chosen.items():
        block = model.layers[layer].mlp.experts
        for t, experts in targets.items():
            setattr(block, t, SelectedExperts(getattr(block, t), experts))
    _randomize_adapters(model, scale=0.3)  # only the selected experts are trainable
    path = minimoe.save_adapter(model, tmp_path / "esft")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["kinds"] == ["esft"]
    assert cfg["esft"] == {f"layers.{l}.mlp.experts.{t}": {"selected": e} for l, ts in chosen.items()
                           for t, e in ts.items()}
    back = minimoe.from_pretrained(directory).load_adapter(path)
    assert torch.equal(_logits(back), _logits(model))
    assert (_logits(back) - _logits(minimoe.from_pretrained(directory))).abs().max() > 1e-3
    assert back.layers[1].mlp.experts.up_proj.selected.tolist() == [0, 3, 7]
    trainable = {n for n, p in back.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{l}.mlp.experts.{t}.trained" for l, ts in chosen.items() for t in ts}
    with pytest.raises(AdapterError, match="PEFT cannot represent layers.0.mlp.experts.gate_proj"):
        minimoe.export_peft(back, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_an_adapter_finds_its_base_after_the_project_moves(hf_checkpoint, tmp_path):
    import shutil

    from minimoe.adapters.io import adapter_base_model
    from minimoe.tools.export_adapter import main

    _, directory = hf_checkpoint("olmoe")
    project = tmp_path / "proj"
    shutil.copytree(directory, project / "weights" / "base")
    model = _epng_like(project / "weights" / "base")
    minimoe.save_adapter(model, project / "runs" / "r" / "adapter")
    moved = tmp_path / "moved"
    project.rename(moved)
    adapter = moved / "runs" / "r" / "adapter"
    assert adapter_base_model(adapter) == str(moved / "weights" / "base")
    assert main(["--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0  # no --model: found it
    assert (_hf_logits(tmp_path / "m") - _logits(model)).abs().max() < 1e-4


def test_adapters_saved_with_the_first_fingerprint_still_load(hf_checkpoint, tmp_path):
    from minimoe.adapters.io import fingerprint

    _, directory = hf_checkpoint("olmoe")
    model = _epng_like(directory)
    path = minimoe.save_adapter(model, tmp_path / "a")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["fingerprint_version"] == 2 and cfg["base_dtype"] == "float32"
    # an adapter written before fingerprint_version existed carries a version-1 fingerprint
    base = minimoe.from_pretrained(directory)
    del cfg["fingerprint_version"], cfg["base_dtype"]
    cfg["base_fingerprint"] = fingerprint(base, version=1)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    assert torch.equal(_logits(base.load_adapter(path)), _logits(model))
    _, clip = hf_checkpoint("olmoe-clip")
    with pytest.raises(AdapterError, match="fingerprint"):  # and still tells bases apart
        minimoe.from_pretrained(clip).load_adapter(path)


def test_a_float16_base_is_explained_not_just_refused(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("olmoe")
    path = minimoe.save_adapter(_epng_like(directory), tmp_path / "a")
    with pytest.raises(AdapterError, match="saved on a float32 base and this one is float16"):
        minimoe.from_pretrained(directory, dtype=torch.float16).load_adapter(path)
    assert minimoe.from_pretrained(directory, dtype=torch.float16).load_adapter(path, check_base=False)


def test_a_written_generation_config_keeps_the_generate_pad_id(tmp_path):
    model = minimoe.CausalLM(minimoe.preset("tiny-qwen3"))
    model.config = model.config.replace(generation_pad_token_id=5, eos_token_id=(7,))
    out = minimoe.export_merged(model, tmp_path / "m")
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 5
    assert json.loads((out / "config.json").read_text()).get("pad_token_id") is None  # not the embedding's


def test_written_files_get_ordinary_permissions(hf_checkpoint, tmp_path):
    import os
    import stat

    _, directory = hf_checkpoint("olmoe")
    umask = os.umask(0o022)
    try:
        path = minimoe.save_adapter(_epng_like(directory), tmp_path / "a")
    finally:
        os.umask(umask)
    for f in path.iterdir():  # safetensors alone would leave adapter.safetensors at 0600
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
