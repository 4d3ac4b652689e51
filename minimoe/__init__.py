"""minimoe: fine-tune Mixture-of-Experts LMs with adapters that change shape while they train."""

from .adapter_base import Adapter, AdapterError
from .adapter_io import save_adapter
from .config import PRESETS, ModelConfig, preset
from .generate import KVCache, generate
from .hf import CheckpointError, from_pretrained
from .expert_lora import ResizableLoRAExpert
from .lora import LoRALinear
from .lora_moe import PrunableLoRAMoE
from .merge import export_merged, export_peft
from .selected_experts import SelectedExperts
from .model import CausalLM, ModelOutput
from .routing import RouterOutput
from .stats import RoutingStats
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterError", "SelectedExperts", "export_merged", "export_peft", "save_adapter",
    "CausalLM", "CheckpointError", "KVCache", "LoRALinear", "ModelConfig", "ModelOutput", "PRESETS",
    "PrunableLoRAMoE", "ResizableLoRAExpert", "RouterOutput", "RoutingStats",
    "Tokenizer", "from_pretrained", "generate", "load_tokenizer", "preset",
]
