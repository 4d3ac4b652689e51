"""Config parsing and every bad input to from_pretrained: each error names its culprit."""

import importlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import minimoe
from minimoe import CheckpointError, ModelConfig

from conftest import save_fused


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_v5_rope_parameters_and_legacy_rope_theta_agree(hf_checkpoint):
    hf, directory = hf_checkpoint("qwen3_moe")
    d = json.loads((directory / "config.json").read_text())
    assert "rope_parameters" in d and "rope_theta" not in d  # v5 writes the new form
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"}
    legacy["rope_theta"] = d["rope_parameters"]["rope_theta"]
    legacy["torch_dtype"] = legacy.pop("dtype", "float32")
    a, b = ModelConfig.from_hf_config(d), ModelConfig.from_hf_config(legacy)
    assert a == b and a.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert a.head_dim == 32 and a.num_experts == 8 and a.norm_topk_prob


def test_config_reads_each_family(hf_checkpoint):
    olmoe = minimoe.from_pretrained(hf_checkpoint("olmoe-clip")[1]).config
    assert olmoe.qk_norm == "full" and olmoe.clip_qkv == 0.6 and olmoe.moe_intermediate_size == 32
    qwen2 = minimoe.from_pretrained(hf_checkpoint("qwen2_moe-sparse")[1]).config
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.moe_layers == [1, 5]
    assert qwen2.shared_expert_intermediate_size == 48
    qwen3 = minimoe.from_pretrained(hf_checkpoint("qwen3-tied")[1]).config
    assert qwen3.qk_norm == "head" and qwen3.num_experts == 0 and qwen3.tie_word_embeddings


def test_null_ids_stay_null_and_absent_keys_take_class_defaults():
    base = {"model_type": "olmoe", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4}
    assert ModelConfig.from_hf_config(base).pad_token_id == 1  # OlmoeConfig's default
    explicit = ModelConfig.from_hf_config({**base, "pad_token_id": None, "eos_token_id": [5, 6]})
    assert explicit.pad_token_id is None and explicit.eos_token_id == (5, 6)
    assert explicit.num_experts == 64 and explicit.num_experts_per_tok == 8 and explicit.rms_norm_eps == 1e-5


def test_presets_build_and_run():
    for name in minimoe.PRESETS:
        model = minimoe.CausalLM(minimoe.preset(name))
        out = model(torch.randint(0, 256, (1, 6)), labels=torch.randint(0, 256, (1, 6)))
        assert out.logits.shape == (1, 6, 256) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="unknown preset 'nope'; available: tiny-olmoe"):
        minimoe.preset("nope")


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"unknown model_type 'mixtral'.*supported: olmoe, qwen2_moe, qwen3, qwen3_moe"):
        minimoe.from_pretrained(tmp_path)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no config.json at {tmp_path}/config.json"):
        minimoe.from_pretrained(tmp_path)


def test_not_a_directory_nor_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        minimoe.from_pretrained(tmp_path / "does-not-exist")


def test_missing_key_is_named(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("olmoe")[1], tmp_path / "m")
    state = load_file(str(directory / "model.safetensors"))
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    del state["model.layers.0.self_attn.k_norm.weight"]
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        minimoe.from_pretrained(directory)
    msg = str(e.value)
    assert "missing keys (2)" in msg
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in msg and "model.layers.0.self_attn.k_norm.weight" in msg


def test_unexpected_key_is_named(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("qwen3_moe")[1], tmp_path / "m")
    state = load_file(str(directory / "model.safetensors"))
    state["model.layers.0.mlp.experts.8.gate_proj.weight"] = torch.zeros(32, 64)  # a 9th expert of 8
    state["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(16)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        minimoe.from_pretrained(directory)
    msg = str(e.value)
    assert "model.layers.0.self_attn.rotary.inv_freq" in msg
    assert "unexpected keys (2)" in msg
    assert "model.layers.0.mlp.experts.8.gate_proj.weight (config.json has 8 experts)" in msg


def test_wrong_shape_is_named(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("qwen2_moe")[1], tmp_path / "m")
    state = load_file(str(directory / "model.safetensors"))
    state["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(60)
    state["model.layers.0.mlp.experts.2.down_proj.weight"] = torch.zeros(32, 64)  # transposed
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        minimoe.from_pretrained(directory)
    msg = str(e.value)
    assert "model.layers.1.self_attn.q_proj.bias in model.safetensors: (60,), expected (64,)" in msg
    assert "model.layers.0.mlp.experts.2.down_proj.weight in model.safetensors: (32, 64) for expert 2" in msg


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors_names_the_file(hf_checkpoint, tmp_path, damage):
    directory = _copy(hf_checkpoint("olmoe")[1], tmp_path / "m")
    file = directory / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64 + data[64:])
    with pytest.raises(CheckpointError, match=f"{file}"):
        minimoe.from_pretrained(directory)


def test_missing_shard_is_named(hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint("olmoe")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shards that do not exist: {shard}"):
        minimoe.from_pretrained(tmp_path)


def test_pytorch_bin_only_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(minimoe.preset("tiny-olmoe").to_hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only safetensors checkpoints are supported"):
        minimoe.from_pretrained(tmp_path)


def test_dtype_and_no_meta_left(hf_checkpoint):
    model = minimoe.from_pretrained(hf_checkpoint("qwen2_moe")[1], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    assert model.layers[0].mlp.experts.gate_proj.weight.shape == (8, 32, 64)
    out = model(torch.randint(0, 128, (1, 8)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


@pytest.mark.slow
def test_hub_id_resolves_from_offline_cache(hf_checkpoint, tmp_path):
    """A Hub id loads through huggingface_hub's cache with HF_HUB_OFFLINE=1 (no network touched)."""
    _, directory = hf_checkpoint("qwen3-tied")
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen3"
    shutil.copytree(directory, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    code = ("import minimoe, torch; m = minimoe.from_pretrained('tiny-org/tiny-qwen3'); "
            "print(m.config.model_type, m.num_parameters())")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "qwen3"
    missing = subprocess.run([sys.executable, "-c", "import minimoe; minimoe.from_pretrained('tiny-org/absent')"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "'tiny-org/absent' is not a local directory" in missing.stderr


@pytest.mark.parametrize("name", list(minimoe.PRESETS))
def test_hub_key_writer_round_trips_and_transformers_reads_it(name, tmp_path):
    """to_hub_state_dict is the exact inverse of the loader's key map, and transformers agrees."""
    from transformers import AutoModelForCausalLM

    from minimoe.model.hf import to_hub_state_dict

    torch.manual_seed(0)
    model = minimoe.CausalLM(minimoe.preset(name)).eval()
    state = model.state_dict()
    if model.tied:
        state.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in to_hub_state_dict(state).items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_config()))

    back = minimoe.from_pretrained(tmp_path)
    assert back.tied == model.tied
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    ids = torch.randint(0, 256, (2, 9))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ref(ids).logits - model(ids).logits).abs().max() < 1e-4


def test_sliding_window_configs_are_refused_not_miscomputed(tmp_path):
    for model_type in ("qwen2_moe", "qwen3", "qwen3_moe"):
        d = {**minimoe.preset(f"tiny-{model_type.replace('_', '-')}").to_hf_config(), "use_sliding_window": True,
             "sliding_window": 4}
        (tmp_path / "config.json").write_text(json.dumps(d))
        with pytest.raises(ValueError, match="use_sliding_window=true in .*config.json: sliding-window attention"):
            ModelConfig.from_json(tmp_path / "config.json")


def test_moe_family_without_sparse_layers_runs():
    model = minimoe.CausalLM(minimoe.preset("tiny-qwen3-moe", mlp_only_layers=[0, 1]))
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    out = model(ids, labels=ids)
    assert out.aux_loss is None and torch.isfinite(out.loss)


def test_dtype_auto_and_bad_dtype(hf_checkpoint):
    directory = hf_checkpoint("qwen2_moe")[1]
    assert next(minimoe.from_pretrained(directory, dtype="auto").parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'float8'"):
        minimoe.from_pretrained(directory, dtype="float8")


def test_generation_config_pad_id_is_for_generate_not_the_embedding(hf_checkpoint, tmp_path):
    """Qwen checkpoints' generation_config.json has pad_token_id (<|endoftext|>) while config.json has
    none: transformers' embedding has no padding_idx then, so that row trains; generate fills with it."""
    import shutil

    from transformers import AutoModelForCausalLM

    _, src = hf_checkpoint("qwen3-untied")
    d = tmp_path / "q"
    shutil.copytree(src, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7], "pad_token_id": 5}))
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model = minimoe.from_pretrained(d)
    assert hf.model.embed_tokens.padding_idx is None and model.embed_tokens.padding_idx is None
    ids = torch.tensor([[5, 9, 5, 3, 11]])
    model(ids, labels=ids).loss.backward()
    hf(ids, labels=ids).loss.backward()
    ours, ref = model.embed_tokens.weight.grad[5], hf.model.embed_tokens.weight.grad[5]
    assert ref.abs().sum() > 0 and torch.allclose(ours, ref, atol=1e-5)
    # a finished row is filled with generation_config's pad id, as transformers does
    gen = importlib.import_module("minimoe.model.generate")  # (minimoe.generate is the function)

    script = iter([torch.tensor([7, 9]), torch.tensor([9, 9]), torch.tensor([9, 7])])
    real = gen.sample_next
    gen.sample_next = lambda *a, **k: next(script)
    try:
        out = model.generate(torch.tensor([[3, 4], [3, 4]]), max_new_tokens=3)
    finally:
        gen.sample_next = real
    assert out[:, 2:].tolist() == [[7, 5, 5], [9, 9, 7]]


def test_duplicate_weights_are_named_not_silently_overwritten(hf_checkpoint, tmp_path):
    hf, src = hf_checkpoint("olmoe")
    # one key in two shards
    directory = _copy(src, tmp_path / "sharded")
    state = load_file(str(directory / "model.safetensors"))
    keys = sorted(state)
    first = {k: state[k] for k in keys[: len(keys) // 2]}
    second = {k: state[k] for k in keys[len(keys) // 2:]}
    second[keys[0]] = state[keys[0]].clone()
    (directory / "model.safetensors").unlink()
    save_file(first, str(directory / "model-00001-of-00002.safetensors"))
    save_file(second, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first} | \
        {k: "model-00002-of-00002.safetensors" for k in second if k not in first}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"duplicate weights \(1\): {keys[0]} in model-00002-of-00002"):
        minimoe.from_pretrained(directory)
    # a layer's experts both fused and per expert
    fused = save_fused(hf, tmp_path / "fused")
    both = {**load_file(str(fused / "model.safetensors")),
            "model.layers.0.mlp.experts.3.up_proj.weight": torch.zeros(32, 64)}
    save_file(both, str(fused / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        minimoe.from_pretrained(fused)
    assert "missing" not in str(e.value)
    assert "duplicate weights (1): model.layers.0.mlp.experts.gate_up_proj in model.safetensors (also " \
           "model.layers.0.mlp.experts.3.up_proj.weight in model.safetensors)" in str(e.value)
