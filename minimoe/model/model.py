"""Decoder-only causal LM for OLMoE, Qwen1.5-MoE, Qwen3 and Qwen3-MoE.

Module names follow the Hub checkpoints without the ``model.`` prefix (``layers.3.self_attn.q_proj``,
``layers.3.mlp.experts.gate_proj``), so the key map reduces to stacking experts (see ``hf.py``).

Shape legend: B batch, T new tokens, S keys (past + T), H hidden, nh/nkv query/key-value heads,
d head_dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .moe import IMPLEMENTATIONS, MLP, SparseMoeBlock, StackedLinear, TopKRouter
from .routing import LoadBalancingLoss, RouterOutput, routing_modules


class RMSNorm(nn.Module):
    """``weight * (x / rms(x))`` with the statistics in fp32, cast back before the weight (as HF)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Default RoPE tables for ``position_ids (B, T)``: cos, sin ``(B, 1, T, d)`` in ``dtype``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, d/2), fp32
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


PACKED_ATTENTION = ("auto", "sdpa", "flex")


def use_flex(choice: str, device) -> bool:
    """Whether packed rows are attended with FlexAttention: ``"flex"``, or ``"auto"`` on a CUDA GPU of compute
    capability 8.0 or more (its Triton kernels skip the masked blocks; SDPA with a dense mask computes them)."""
    if choice not in PACKED_ATTENTION:
        raise ValueError(f"packed attention {choice!r} not in {PACKED_ATTENTION}")
    device = torch.device(device)
    return choice == "flex" or (choice == "auto" and device.type == "cuda"
                                and torch.cuda.get_device_capability(device) >= (8, 0))


@functools.cache
def _compiled_flex_attention():
    """FlexAttention is fused only when compiled; outside a compiled block it is compiled on its own once."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_attention(q, k, v, block_mask, scale: float, enable_gqa: bool) -> torch.Tensor:
    """``(B, nh, T, d)`` attention under a FlexAttention ``block_mask`` (packed rows): inside a compiled block the
    plain function (the block's compile fuses it), on CUDA compiled, on CPU the reference (forward only)."""
    from torch.nn.attention.flex_attention import flex_attention as plain

    fn = plain if torch.compiler.is_compiling() or q.device.type != "cuda" else _compiled_flex_attention()
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


@dataclass
class AttentionMask:
    """What SDPA gets: an explicit boolean ``mask (B, 1, T, S)`` or ``is_causal`` (or neither); for packed rows on
    FlexAttention instead, ``block_mask`` (``use_flex``)."""

    mask: torch.Tensor | None
    is_causal: bool
    block_mask: object | None = None  # torch.nn.attention.flex_attention.BlockMask

    @classmethod
    def build(cls, attention_mask: torch.Tensor | None, T: int, past: int, device,
              position_ids: torch.Tensor | None = None, packed_attention: str = "sdpa") -> "AttentionMask":
        """Causal attention over real tokens. ``attention_mask (B, past + T)``: 1 = real, 0 = padding.

        A padding query may attend to itself, so no row is fully masked (SDPA would return NaN there,
        and NaN in a cached padding key would poison later queries through ``0 · NaN``).

        Packed rows (``position_ids (B, T)`` that restart at 0 inside a row, without a cache: the padding-free
        convention of transformers' ``DataCollatorWithFlattening``): each segment is its own document, so
        attention is block-diagonal causal and a token sees only its own example.
        """
        if past == 0 and position_ids is not None and T > 1 and bool((position_ids[:, 1:] == 0).any()):
            doc = (position_ids == 0).long().cumsum(-1)  # (B, T): the example each token belongs to
            real = (attention_mask.bool() if attention_mask is not None
                    else torch.ones(doc.shape, dtype=torch.bool, device=device))  # (B, T)
            if use_flex(packed_attention, device):  # the same rule as a mask function, evaluated per block:
                # blocks nobody attends are skipped
                from torch.nn.attention.flex_attention import create_block_mask

                def same_example(b, h, q, kv):
                    return ((doc[b, q] == doc[b, kv]) & (q >= kv) & real[b, kv]) | (q == kv)

                return cls(None, False, create_block_mask(same_example, doc.shape[0], None, T, T, device=device))
            same = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=device)
            return cls(((causal & same & real[:, None, :]) | eye)[:, None], False)
        if attention_mask is None or bool(attention_mask.all()):
            if past == 0:
                return cls(None, T > 1)
            if T == 1:
                return cls(None, False)
            attention_mask = torch.ones(1, past + T, dtype=torch.bool, device=device)
        S = attention_mask.shape[-1]
        q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        causal = k_pos <= q_pos  # (T, S)
        real = attention_mask.bool()[:, None, :] | (k_pos == q_pos)[None]  # (B, T, S)
        return cls((causal[None] & real)[:, None], False)


class Attention(nn.Module):
    """Multi-head attention with GQA, RoPE and the family's q/k norm, through SDPA."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.nh * self.d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(H, self.nkv * self.d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(H, self.nkv * self.d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.d, H, bias=config.o_bias)
        self.qk_norm, self.clip_qkv = config.qk_norm, config.clip_qkv
        if config.qk_norm == "full":  # OLMoE: over the whole projection, before the head split
            self.q_norm = RMSNorm(self.nh * self.d, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.nkv * self.d, config.rms_norm_eps)
        elif config.qk_norm == "head":  # Qwen3: per head over d, shared by all heads
            self.q_norm = RMSNorm(self.d, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask: AttentionMask, kv_cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.nh, self.d)
        k = k.view(B, T, self.nkv, self.d)
        v = v.view(B, T, self.nkv, self.d)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, nkv, S, d)
        if mask.block_mask is not None:  # packed rows on FlexAttention
            o = flex_attention(q, k, v, mask.block_mask, self.d**-0.5, self.nh != self.nkv)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal,
                                               scale=self.d**-0.5, enable_gqa=self.nh != self.nkv)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.d))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x += attn(norm(x)); x += mlp(norm(x))`` with a dense MLP or a sparse MoE."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        if config.is_moe_layer(layer):
            self.mlp = SparseMoeBlock(config, layer)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None) -> tuple[torch.Tensor, RouterOutput | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoeBlock):
            h, route = self.mlp(h)
            return x + h, route
        return x + self.mlp(h), None


@dataclass
class ModelOutput:
    """What ``Transformer.forward`` (``CausalLM.forward``) returns.

    Attributes:
        logits: ``(B, T, V)`` in the model dtype.
        loss: shifted causal-LM cross-entropy (fp32) when labels were given; never includes aux_loss.
        aux_loss: router load-balancing loss (transformers' formula) for MoE models, else None.
            Add ``config.router_aux_loss_coef * aux_loss`` yourself if you train with it.
        router: per MoE layer routing (``RouterOutput``, unit = layer index) when ``output_router=True``.
        adapter_aux_loss: sum of the LoRA-MoE load-balancing losses (training forwards with LoRA-MoE
            whose loss is on), else None. Also never added to ``loss``.
        adapter_router: per LoRA-MoE module routing (unit = module path) of a training forward, when
            ``output_router=True`` (empty in eval or under no_grad: statistics come from training forwards).
        adapter_balancing: the same modules' load-balancing pools (``LoadBalancingLoss``: f, P, tokens), from
            which ``adapter_aux_loss`` is summed and DMEP's LB term is combined
            (``routing.combined_balancing_loss``: mean or sum, f over every process); None without any.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router: list[RouterOutput] | None = None
    adapter_aux_loss: torch.Tensor | None = None
    adapter_router: list[RouterOutput] | None = None
    adapter_balancing: list[LoadBalancingLoss] | None = None


class Transformer(nn.Module):
    """The network: ``embed_tokens → layers → norm → lm_head``. ``minimoe.CausalLM`` is this class with the
    model-level adapter methods (``adapters/attach.py``); build it with ``minimoe.CausalLM(config)`` (random
    init) or load it with ``minimoe.from_pretrained``. Nothing here knows about adapters."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.compiled_layers: list[nn.Module] | None = None  # compiling.compile_layers: not submodules, not saved
        self.packed_attention = "auto"  # packed rows: FlexAttention on a recent CUDA GPU, else SDPA (use_flex)
        if config.tie_word_embeddings:
            self.tie_weights()
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    # --- construction helpers ----------------------------------------------------------------
    def tie_weights(self) -> None:
        """Share the input embedding with the output head (tied checkpoints without ``lm_head``)."""
        self.lm_head.weight = self.embed_tokens.weight

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init like transformers (normal(0, std) matrices, unit norms, zero biases)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, StackedLinear, TopKRouter)):
                m.weight.normal_(0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def set_experts_implementation(self, implementation: str) -> None:
        """``"auto"`` (grouped_mm where supported), ``"grouped_mm"`` or ``"loop"`` (the reference)."""
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"experts implementation {implementation!r} not in {IMPLEMENTATIONS}")
        for m in self.modules():
            if hasattr(m, "implementation"):  # Experts, PrunableLoRAMoE
                m.implementation = implementation

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen = {id(p): p for p in self.parameters() if p.requires_grad or not trainable_only}
        return sum(p.numel() for p in seen.values())

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache=None,
        output_router: bool = False,
        logits_to_keep: int = 0,
        token_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Args:
            input_ids: ``(B, T)``.
            attention_mask: ``(B, past + T)``, 1 for real tokens and 0 for padding (left or right).
            labels: ``(B, T)``; position t is scored against label t+1; -100 is ignored.
            position_ids: ``(B, T)``; default from the attention mask (cumsum - 1), else
                ``past + arange(T)``. Restarting at 0 inside a row (packed examples), each segment is attended
                to as its own document (``AttentionMask.build``).
            kv_cache: a ``generate.KVCache`` to read and extend.
            output_router: return per-MoE-layer routing in ``out.router``.
            logits_to_keep: if > 0, compute logits for the last n positions only.
            token_mask: ``(B, T)``, which tokens count for the LoRA-MoE load-balancing loss (and, by the
                caller's choice, for routing statistics); default: the real tokens of ``attention_mask``.
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        given = position_ids  # (only positions the caller gives can mark packed examples)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        mask = AttentionMask.build(attention_mask, T, past, input_ids.device, given, self.packed_attention)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)

        lb, routes = None, []
        if self.config.num_experts and self.config.moe_layers and kv_cache is None:
            lb_mask = None if attention_mask is None else attention_mask[:, -T:]  # as transformers: real tokens
            lb = LoadBalancingLoss(self.config.num_experts, self.config.num_experts_per_tok, lb_mask)
        if token_mask is None and attention_mask is not None:
            token_mask = attention_mask[:, -T:]
        # adapters that route tokens (LoRA-MoE): their mask in, routing out; generation (a KV cache) reads neither,
        # and is spared the walk over the modules at every token
        routers = routing_modules(self) if kv_cache is None else []
        flat_mask = None if token_mask is None else token_mask.reshape(-1)
        for m in routers:
            m.token_mask, m.last_route, m.balancing = flat_mask, None, None
        # the compiled blocks (compiling.compile_layers) run training and scoring forwards; generation (a KV
        # cache: new shapes at every token) runs the plain ones
        blocks = self.compiled_layers if self.compiled_layers and kv_cache is None else self.layers
        for i, layer in enumerate(blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, route = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x, route = layer(x, cos, sin, mask, kv_cache)
            if route is not None:
                route.unit = i
                if lb is not None:
                    lb.add(route.logits)
                if output_router:
                    routes.append(route)
        if kv_cache is not None:
            kv_cache.length += T

        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        pools = [m.balancing for m in routers if m.balancing is not None] or None
        adapter_aux = torch.stack([p.value() for p in pools]).sum() if pools else None
        adapter_routes = None
        if output_router:  # statistics come from training forwards only (not eval, not under no_grad)
            adapter_routes = []
            if routers and self.training and torch.is_grad_enabled():
                names = {id(m): n for n, m in self.named_modules()}
                adapter_routes = [dataclasses.replace(m.last_route, unit=names[id(m)]) for m in routers
                                  if m.last_route is not None]
        for m in routers:
            m.last_route = None  # (its tensors are not kept alive until the next forward)
        return ModelOutput(logits, loss, lb.value() if lb is not None else None, routes if output_router else None,
                           adapter_aux, adapter_routes, pools)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """KV-cache generation; see ``minimoe.model.generate.generate`` for the arguments."""
        from .generate import generate

        return generate(self, input_ids, **kwargs)
