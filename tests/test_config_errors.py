"""A bad config.json is a ValueError naming the file and every key at fault, never a bare KeyError."""

import json
import re

import pytest
import transformers
from conftest import _COMMON, HF_CLASSES, VARIANTS

import minimoe
from minimoe import ModelConfig

FAMILIES = ("olmoe", "qwen2_moe", "qwen3-tied", "qwen3_moe")


def _saved_config(tmp_path, variant) -> tuple:
    """The config.json transformers' ``save_pretrained`` writes for a tiny ``variant``, and its config."""
    model_type, overrides = VARIANTS[variant]
    config = getattr(transformers, HF_CLASSES[model_type][0])(**{**_COMMON, **overrides})
    directory = tmp_path / variant
    config.save_pretrained(directory)
    return directory, config


def _write(directory, **changes):
    """Rewrite ``directory/config.json`` with ``changes`` (value ``...`` deletes the key)."""
    file = directory / "config.json"
    d = json.loads(file.read_text())
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    file.write_text(json.dumps(d))
    return file


@pytest.mark.parametrize("variant", FAMILIES)
def test_missing_keys_are_all_named_with_the_file(tmp_path, variant):
    directory, hf = _saved_config(tmp_path, variant)
    ok = ModelConfig.from_json(directory / "config.json")  # the untouched file loads, with transformers' sizes
    assert (ok.vocab_size, ok.hidden_size, ok.num_hidden_layers) == (hf.vocab_size, hf.hidden_size,
                                                                      hf.num_hidden_layers)
    file = _write(directory, vocab_size=..., hidden_size=...)
    expected = f"{re.escape(str(file))} \\({hf.model_type}\\) is missing required keys vocab_size, hidden_size"
    with pytest.raises(ValueError, match=expected) as info:
        ModelConfig.from_json(file)
    assert not isinstance(info.value, KeyError)
    # from_pretrained fails the same way, before it looks for weights
    with pytest.raises(ValueError, match=expected):
        minimoe.from_pretrained(directory)


def test_null_counts_as_missing_and_one_key_is_singular(tmp_path):
    directory, _ = _saved_config(tmp_path, "qwen3-tied")
    file = _write(directory, num_hidden_layers=None)
    with pytest.raises(ValueError, match=r"missing required key num_hidden_layers \(absent or null\)$"):
        ModelConfig.from_json(file)
    file = _write(directory, vocab_size=..., hidden_size=..., num_attention_heads=...)
    with pytest.raises(ValueError, match="missing required keys vocab_size, hidden_size, num_hidden_layers, "
                                         "num_attention_heads"):
        ModelConfig.from_json(file)


def test_where_the_dict_came_from_is_named():
    d = {"model_type": "olmoe", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    with pytest.raises(ValueError, match=r"^config\.json \(olmoe\) is missing required key vocab_size"):
        ModelConfig.from_hf_config(d)
    with pytest.raises(ValueError, match=r"^weights/x/config\.json \(olmoe\) is missing"):
        ModelConfig.from_hf_config(d, name_or_path="weights/x")
    with pytest.raises(ValueError, match=r"^/data/cfg\.json \(olmoe\) is missing"):
        ModelConfig.from_hf_config(d, name_or_path="weights/x", source="/data/cfg.json")
    with pytest.raises(ValueError, match=r"^preset 'tiny-olmoe' \(olmoe\) is missing required key vocab_size"):
        minimoe.preset("tiny-olmoe", vocab_size=None)


def test_wrong_values_are_named_with_the_file(tmp_path):
    directory, _ = _saved_config(tmp_path, "qwen3_moe")
    file = _write(directory, vocab_size="128", hidden_size=0, num_attention_heads=True, head_dim=-1)
    with pytest.raises(ValueError, match=f"{re.escape(str(file))}: vocab_size='128', hidden_size=0, "
                                         "num_attention_heads=True, head_dim=-1: must be positive integers"):
        ModelConfig.from_json(file)
    file = _write(directory, vocab_size=128, hidden_size=64, num_attention_heads=4, head_dim=32,
                  num_key_value_heads=3)
    with pytest.raises(ValueError, match=f"{re.escape(str(file))}: num_attention_heads=4 is not a multiple of "
                                         "num_key_value_heads=3"):
        ModelConfig.from_json(file)
    file = _write(directory, num_key_value_heads=2, rope_parameters="linear")
    with pytest.raises(ValueError, match=f"{re.escape(str(file))}: rope_parameters must be an object, got 'linear'"):
        ModelConfig.from_json(file)
    file.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{re.escape(str(file))} must hold a JSON object, got list"):
        ModelConfig.from_json(file)


def test_zero_head_dim_and_kv_heads_are_still_derived():
    base = {**minimoe.preset("tiny-qwen3").to_hf_config(), "head_dim": 0, "num_key_value_heads": 0}
    cfg = ModelConfig.from_hf_config(base)
    assert cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads
    assert cfg.num_key_value_heads == cfg.num_attention_heads
