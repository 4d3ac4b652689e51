"""minimoe: fine-tune Mixture-of-Experts LMs with adapters that change shape while they train.

Subpackages, bottom up: ``model`` (the network, Hub checkpoints in and out, the shipped tiny models),
``adapters`` (the layers that prune and grow, their optimizer state, ``CausalLM`` = the network with the adapter
methods), ``policies`` (EPnG, DMEP and the baselines, and the routing statistics they decide from), ``data``
(sources, record formats, batches), ``parallel`` (several processes), ``train`` (the loop, run directory,
checkpoints, recipes, the ``train`` command), ``eval`` (benchmarks, graders, the ``eval`` command) and ``tools``
(bench, plan, check, convert, export, plots, reproduce, scaling, tiny); ``utils`` holds atomic writes and option
fields. ``minimoe SUBCOMMAND`` (``cli``) runs the commands. The modules left at this level under the old command
names (``bench``, ``plan``, ...) only keep ``python -m minimoe.bench`` working.
"""

from .adapters import optim
from .adapters.adamw import AdamW
from .adapters.base import Adapter, AdapterError
from .adapters.expert_lora import ResizableLoRAExpert
from .adapters.export import export_merged, export_peft
from .adapters.io import save_adapter
from .adapters.lora import LoRALinear
from .adapters.lora_moe import PrunableLoRAMoE
from .adapters.selected import SelectedExperts
from .adapters.lm import CausalLM, from_pretrained
from .model.config import PRESETS, ModelConfig, preset
from .model.generate import KVCache, generate
from .model.hf import CheckpointError
from .model.model import ModelOutput, Transformer
from .model.routing import RouterOutput
from .model.tokenizer import Tokenizer, load_tokenizer
from .policies.stats import RoutingStats

__version__ = "0.1.0"

__all__ = [
    "AdamW", "Adapter", "AdapterError", "SelectedExperts", "export_merged", "export_peft", "save_adapter",
    "CausalLM", "CheckpointError", "KVCache", "LoRALinear", "ModelConfig", "ModelOutput", "PRESETS",
    "PrunableLoRAMoE", "ResizableLoRAExpert", "RouterOutput", "RoutingStats", "Transformer",
    "Tokenizer", "from_pretrained", "generate", "load_tokenizer", "optim", "preset",
]
