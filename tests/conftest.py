"""Shared fixtures: tiny random transformers models of each family, saved locally (never downloaded)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

import transformers  # noqa: E402  (the reference; a test-only dependency)

from minimoe.tools.check_numerics import randomize  # noqa: E402  (after HF_HUB_OFFLINE is set)



@pytest.fixture(autouse=True, scope="session")
def _system_temp_inside_the_session(tmp_path_factory):
    """What the code under test writes to the system temp dir (the sandbox's ``minimoe-exec-*`` work dirs, the
    benchmark's checkpoints, a killed evaluation's leftovers), in this process and the subprocesses it starts,
    lands in this session's pytest directory instead of the machine's /tmp."""
    tmp = tmp_path_factory.mktemp("system-temp")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(tmp), str(tmp)
    yield tmp
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]


HF_CLASSES = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=None)

# name -> (model_type, config overrides): every variant the parity tests cover
VARIANTS = {
    "olmoe": ("olmoe", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, pad_token_id=1)),
    "olmoe-clip": ("olmoe", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=3, clip_qkv=0.6,
                                 num_key_value_heads=4)),
    "qwen2_moe": ("qwen2_moe", dict(intermediate_size=96, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2)),
    "qwen2_moe-sparse": ("qwen2_moe", dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3],
                                           intermediate_size=96, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=48, num_experts=6,
                                           num_experts_per_tok=2)),
    "qwen3-tied": ("qwen3", dict(head_dim=32, intermediate_size=96, tie_word_embeddings=True)),
    "qwen3-untied": ("qwen3", dict(head_dim=24, intermediate_size=96, tie_word_embeddings=False,
                                   num_key_value_heads=1)),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                    num_experts_per_tok=3, norm_topk_prob=True)),
}


def build_hf(model_type: str, seed: int = 0, **overrides):
    """A tiny random transformers model in fp32, eval mode, with weights large enough that routing,
    norms and biases all matter (HF's 0.02 init makes every logit ~0)."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in HF_CLASSES[model_type])
    config = cfg_cls(**{**_COMMON, **overrides})
    torch.manual_seed(seed)
    return randomize(model_cls(config).float().eval(), seed)  # (the self-check draws its weights the same way)


def save_fused(model, directory: Path) -> Path:
    """Write the transformers v5 in-memory layout (fused ``gate_up_proj``/``down_proj``) as-is."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    assert any(k.endswith("experts.gate_up_proj") for k in state), "expected fused expert keys"
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    return directory


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(variant) -> (hf_model, directory)``; each variant saved once per session."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            model_type, overrides = VARIANTS[variant]
            model = build_hf(model_type, **overrides)
            directory = tmp_path_factory.mktemp(variant)
            model.save_pretrained(directory)
            cache[variant] = (model, directory)
        return cache[variant]

    return get
