"""One frozen config for the four supported families, built from a Hub ``config.json``.

The families differ in a handful of switches (q/k norm style, biases, shared expert, top-k
renormalisation, which layers are sparse); everything else is shared. Derived values
(``head_dim``, which layers are MoE) live here so the model code never re-derives them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# model_type -> family-specific switches that config.json does not spell out.
#   qk_norm: "full" = RMSNorm over the whole projected q/k vector (OLMoE),
#            "head" = RMSNorm over head_dim, shared by all heads (Qwen3), "none".
FAMILIES = {
    "olmoe": dict(qk_norm="full"),
    "qwen2_moe": dict(qk_norm="none"),
    "qwen3": dict(qk_norm="head"),
    "qwen3_moe": dict(qk_norm="head"),
}

# Defaults of the transformers config classes (v5.23), used when a config.json omits a key.
_HF_DEFAULTS = {
    "olmoe": dict(intermediate_size=2048, rms_norm_eps=1e-5, num_experts=64, num_experts_per_tok=8,
                  norm_topk_prob=False, router_aux_loss_coef=0.01, pad_token_id=1, eos_token_id=50279,
                  max_position_embeddings=4096, rope_theta=10000.0),
    "qwen2_moe": dict(intermediate_size=5632, rms_norm_eps=1e-6, num_experts=60, num_experts_per_tok=4,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                      norm_topk_prob=False, router_aux_loss_coef=0.001, qkv_bias=True,
                      max_position_embeddings=32768, rope_theta=10000.0),
    "qwen3": dict(intermediate_size=22016, rms_norm_eps=1e-6, head_dim=128,
                  max_position_embeddings=32768, rope_theta=10000.0),
    "qwen3_moe": dict(intermediate_size=6144, rms_norm_eps=1e-6, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768, norm_topk_prob=False, router_aux_loss_coef=0.001,
                      max_position_embeddings=32768, rope_theta=10000.0),
}

_DTYPES = ("float32", "bfloat16", "float16")
# keys with no default: a config.json without them (or with null) is refused, naming them all
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_POSITIVE_INTS = _REQUIRED + ("intermediate_size", "moe_intermediate_size", "max_position_embeddings")
_DERIVED_IF_ZERO = ("num_key_value_heads", "head_dim")  # 0 (like absent): num_attention_heads, hidden/heads


def _is_int_at_least(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one checkpoint. Field names follow the Hub ``config.json``.

    ``num_experts == 0`` means a dense model. ``moe_intermediate_size`` is the width of one routed
    expert (OLMoE stores it in ``intermediate_size``; ``from_hf_config`` copies it over).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (Qwen3, mlp_only_layers)
    moe_intermediate_size: int = 0  # routed expert width
    shared_expert_intermediate_size: int = 0  # Qwen1.5-MoE shared expert (0 = none)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    qk_norm: str = "none"  # "none" | "full" | "head"
    qkv_bias: bool = False  # biases on q/k/v projections
    o_bias: bool = False  # bias on o_proj
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.0
    pad_token_id: int | None = None  # config.json's: the embedding's padding_idx, as in transformers
    # generation_config.json's pad id: what generate() fills finished rows with. Kept apart from
    # pad_token_id, which would freeze that embedding row's gradient (transformers never uses it there).
    generation_pad_token_id: int | None = field(default=None, compare=False)
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    dtype: str = "float32"  # dtype the checkpoint was saved in
    name_or_path: str = field(default="", compare=False)

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"unknown model_type {self.model_type!r}; supported: {', '.join(FAMILIES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not in {_DTYPES}")

    # --- derived -------------------------------------------------------------------------------
    def is_moe_layer(self, layer_idx: int) -> bool:
        """Which decoder layers hold a sparse MoE block (the transformers rule per family)."""
        if self.num_experts == 0:
            return False
        if self.model_type == "olmoe":
            return True
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # --- Hub config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, d: dict, name_or_path: str = "", source: str | Path | None = None) -> "ModelConfig":
        """Build from the dict of a Hub ``config.json`` (transformers v4 or v5 style).

        ``source``: the file ``d`` was read from, named in errors (default: ``name_or_path/config.json``).
        """
        where = str(source) if source is not None else f"{name_or_path}/config.json" if name_or_path else "config.json"
        if not isinstance(d, dict):
            raise ValueError(f"{where} must hold a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            at = f" in {source}" if source is not None else f" in {name_or_path}" if name_or_path else ""
            raise ValueError(f"unknown model_type {model_type!r}{at}; supported: {', '.join(FAMILIES)}")
        # a key set to null keeps the class default, except ids and clip_qkv where null is meaningful
        nullable = ("clip_qkv", "pad_token_id", "bos_token_id", "eos_token_id")
        g = {**_HF_DEFAULTS[model_type], **{k: v for k, v in d.items() if v is not None or k in nullable}}
        missing = [k for k in _REQUIRED if k not in g]
        if missing:
            raise ValueError(f"{where} ({model_type}) is missing required key{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)} (absent or null)")
        wrong = [f"{k}={g[k]!r}" for k in _POSITIVE_INTS + _DERIVED_IF_ZERO
                 if k in g and not _is_int_at_least(g[k], 1 if k in _POSITIVE_INTS else 0)]
        if wrong:
            raise ValueError(f"{where}: {', '.join(wrong)}: must be positive integers")

        if d.get("use_sliding_window"):
            raise ValueError(f"use_sliding_window=true in {where}: sliding-window attention "
                             "is not implemented in minimoe (the reference checkpoints have it off); refusing to "
                             "load rather than compute different logits")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
            raise ValueError(f"{where}: {key} must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} in {where} is not supported "
                             "(only the default RoPE of OLMoE/Qwen checkpoints)")
        rope_theta = rope.get("rope_theta", g.get("rope_theta"))

        heads = g["num_attention_heads"]
        kv_heads = g.get("num_key_value_heads") or heads
        head_dim = g.get("head_dim") or g["hidden_size"] // heads
        num_experts = d.get("num_experts", d.get("num_local_experts")) or g.get("num_experts", 0)
        if model_type == "olmoe":
            moe_width, shared = g["intermediate_size"], 0
            qkv_bias = o_bias = bool(g.get("attention_bias", False))
        elif model_type == "qwen2_moe":
            moe_width, shared = g["moe_intermediate_size"], g.get("shared_expert_intermediate_size", 0)
            qkv_bias, o_bias = bool(g.get("qkv_bias", True)), False
        else:
            moe_width, shared = g.get("moe_intermediate_size", 0), 0
            qkv_bias = o_bias = bool(g.get("attention_bias", False))
        if model_type == "qwen3":
            num_experts = 0

        eos = g.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        dtype = str(g.get("dtype") or g.get("torch_dtype") or "float32").replace("torch.", "")
        fields = dict(
            model_type=model_type,
            vocab_size=g["vocab_size"],
            hidden_size=g["hidden_size"],
            num_hidden_layers=g["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=g["intermediate_size"],
            moe_intermediate_size=moe_width if num_experts else 0,
            shared_expert_intermediate_size=shared if num_experts else 0,
            num_experts=num_experts,
            num_experts_per_tok=g.get("num_experts_per_tok", 0) if num_experts else 0,
            norm_topk_prob=bool(g.get("norm_topk_prob", False)),
            decoder_sparse_step=g.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=tuple(g.get("mlp_only_layers") or ()),
            qk_norm=FAMILIES[model_type]["qk_norm"],
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            clip_qkv=g.get("clip_qkv"),
            rms_norm_eps=g["rms_norm_eps"],
            rope_theta=float(rope_theta),
            max_position_embeddings=g["max_position_embeddings"],
            tie_word_embeddings=bool(g.get("tie_word_embeddings", False)),
            router_aux_loss_coef=float(g.get("router_aux_loss_coef", 0.0)) if num_experts else 0.0,
            pad_token_id=g.get("pad_token_id"),
            bos_token_id=g.get("bos_token_id"),
            eos_token_id=eos,
            dtype=dtype,
            name_or_path=name_or_path,
        )
        try:
            return cls(**fields)
        except ValueError as e:  # __post_init__'s checks, with the file they came from
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_config(d, name_or_path=str(path.parent), source=path)

    def to_hf_config(self) -> dict:
        """The ``config.json`` transformers v5 reads for this architecture (used by exports)."""
        d = dict(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size, hidden_act="silu", rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            dtype=self.dtype,
        )
        arch = {"olmoe": "OlmoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[self.model_type]
        d["architectures"] = [arch]
        if self.model_type == "qwen2_moe":
            d["qkv_bias"] = self.qkv_bias
        else:
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "olmoe":
            d.update(clip_qkv=self.clip_qkv, intermediate_size=self.moe_intermediate_size)
        if self.num_experts:
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     norm_topk_prob=self.norm_topk_prob, router_aux_loss_coef=self.router_aux_loss_coef)
        if self.model_type in ("qwen2_moe", "qwen3_moe"):
            d.update(moe_intermediate_size=self.moe_intermediate_size,
                     decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers))
        if self.model_type == "qwen2_moe":
            d["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        return d


# Named tiny presets (random init) for tests and quick experiments. Real sizes come from the Hub
# config.json of the checkpoint (see REFERENCE.md §1 for the four reference checkpoints).
_TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
PRESETS: dict[str, dict] = {
    # https://huggingface.co/allenai/OLMoE-1B-7B-0125/blob/main/config.json (shrunk)
    "tiny-olmoe": dict(model_type="olmoe", **_TINY, intermediate_size=32, num_experts=8,
                       num_experts_per_tok=2, rms_norm_eps=1e-5, router_aux_loss_coef=0.01, pad_token_id=1),
    # https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json (shrunk)
    "tiny-qwen2-moe": dict(model_type="qwen2_moe", **_TINY, intermediate_size=96, moe_intermediate_size=32,
                           shared_expert_intermediate_size=96, num_experts=8, num_experts_per_tok=2),
    # https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json (shrunk; head_dim != hidden/heads)
    "tiny-qwen3": dict(model_type="qwen3", **{**_TINY, "num_hidden_layers": 3}, head_dim=32,
                       intermediate_size=96, tie_word_embeddings=True),
    # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json (shrunk)
    "tiny-qwen3-moe": dict(model_type="qwen3_moe", **_TINY, head_dim=32, intermediate_size=96,
                           moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named tiny config, e.g. ``preset("tiny-olmoe", num_experts=16)`` (keys as in config.json)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return ModelConfig.from_hf_config({**PRESETS[name], **overrides}, name_or_path=name, source=f"preset {name!r}")
