"""Autoregressive generation with a preallocated KV cache: greedy or sampled, batched, left-padded."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import ModelConfig


class KVCache:
    """Keys and values of every layer, ``(B, nkv, max_length, d)``, written after RoPE.

    ``length`` is the number of positions already stored; the model advances it after each forward.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, dtype: torch.dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_length = max_length
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} requested")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def sample_next(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits (B, V)``: argmax, or a draw after temperature/top-k/top-p."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # as transformers' TopPLogitsWarper: drop a token once the more probable ones reach top_p
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop[..., 0] = False  # the most probable token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue ``input_ids (B, T)`` by up to ``max_new_tokens``; returns ``(B, T + n)``.

    Args:
        attention_mask: ``(B, T)``, 0 on (left) padding; positions come from its cumulative sum,
            so a left-padded row generates exactly what it would alone.
        do_sample, temperature, top_p, top_k: greedy when ``do_sample`` is False.
        eos_token_id: one id or several; ``None`` takes ``model.config.eos_token_id``; ``[]`` never
            stops early. A finished row is filled with ``pad_token_id``.
        pad_token_id: defaults to generation_config.json's pad id, else config.json's, else the first eos
            id, else 0 (transformers' order).
        generator: RNG for sampling.
    """
    config = model.config
    B, T = input_ids.shape
    device = input_ids.device
    eos = config.eos_token_id if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    eos_t = torch.tensor(list(eos), dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = next((p for p in (config.generation_pad_token_id, config.pad_token_id) if p is not None),
                            eos[0] if eos else 0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = KVCache(config, B, T + max_new_tokens, model.dtype, device)

    out = [input_ids]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(input_ids, attention_mask=attention_mask, kv_cache=cache, logits_to_keep=1).logits[:, -1]
    for step in range(max_new_tokens):
        token = sample_next(logits, do_sample, temperature, top_p, top_k, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        out.append(token[:, None])
        if len(eos):
            finished |= torch.isin(token, eos_t)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
        logits = model(token[:, None], attention_mask=attention_mask, kv_cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)
