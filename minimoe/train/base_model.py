"""The base a run trains: a checkpoint (a directory, a shipped model's name or a Hub id) with its tokenizer, or a
tiny preset built with random weights and the byte tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters.lm import CausalLM, from_pretrained
from ..model.config import preset
from ..model.tokenizer import Tokenizer, byte_tokenizer, load_tokenizer
from .config import is_preset


def load_model_and_tokenizer(name: str, device: str, seed: int, base_dir: Path | None = None,
                             dtype: torch.dtype = torch.float32) -> tuple[CausalLM, Tokenizer]:
    """A checkpoint directory or Hub id, or a tiny preset with random weights and a byte tokenizer.
    A preset model is named after ``base_dir``, where the run writes it (``RunDir.write_preset_base``) so
    exports and eval have a base on disk."""
    if is_preset(name):
        tok = byte_tokenizer()
        vocab = -(-tok.vocab_size // 16) * 16
        config = preset(name, vocab_size=vocab, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        model = CausalLM(config).to(device=device, dtype=dtype)
        if base_dir is not None:
            model.config = model.config.replace(name_or_path=str(base_dir))
        return model, tok
    return from_pretrained(name, dtype=dtype, device=device), load_tokenizer(name)
