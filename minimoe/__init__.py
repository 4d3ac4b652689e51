"""minimoe: fine-tune Mixture-of-Experts LMs with adapters that change shape while they train.

Subpackages: ``model`` (the network), ``adapters`` (the layers that prune and grow, and their optimizer
state), ``policies`` (EPnG, DMEP and the baselines, and the routing statistics they decide from), ``train``
(the loop, run directory, checkpoints, several processes), ``eval`` (benchmarks and graders). ``lm.CausalLM``
joins the network and its adapter methods; the modules at the top are commands
(``minimoe bench|check|convert|export|scaling|tiny|plots|reproduce``) and two small utilities
(``files``, ``options``).
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
