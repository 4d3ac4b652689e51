"""``CausalLM``: the model people use — the network (``model.Transformer``) with the model-level adapter
methods (``adapters.attach.AdapterMixin``: ``add_expert_lora``, ``prune_lora_moe``, ...) — and
``from_pretrained``, which loads a Hub or local checkpoint into it.

It sits above both subpackages so that neither imports the other's direction the wrong way: the network
knows nothing of adapters, and the adapters wrap the network's modules.
"""

from __future__ import annotations

import os

import torch

from .attach import AdapterMixin
from ..model import hf
from ..model.model import Transformer


class CausalLM(AdapterMixin, Transformer):
    """The network and its adapter methods. ``CausalLM(config)`` builds it with random weights."""


def from_pretrained(path_or_repo_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, revision: str | None = None) -> CausalLM:
    """Load a checkpoint of a supported family (a directory or a Hub id) as a ``CausalLM``.

    Args:
        path_or_repo_id: directory with ``config.json`` and safetensors, or a Hub id.
        dtype: parameter dtype; default: the dtype recorded in config.json (``dtype``/``torch_dtype``),
            float32 if none; ``"auto"`` the same.
        device: where the parameters live (default CPU).
        revision: Hub branch, tag or commit.
    """
    return hf.from_pretrained(path_or_repo_id, dtype, device, revision, cls=CausalLM)
