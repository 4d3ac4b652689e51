"""The transformers (+ PEFT) routes of ``minimoe bench``: the reference side of the benchmark.

The only module of minimoe that imports transformers and peft (the ``bench`` extra), and only inside its
functions: the benchmark's worker imports it when it runs a transformers route, the self-check and the tests
when they compare against transformers. Nothing that trains or evaluates imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch


def setup(setup_name: str, implementation: str, directory: Path, device: str, dtype: torch.dtype):
    """Load the checkpoint in transformers with ``implementation`` experts; ``peft-lora`` adds PEFT LoRA.
    Returns (model in train mode, trainable parameters)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    model.set_experts_implementation(implementation)
    if setup_name == "peft-lora":
        from peft import LoraConfig, get_peft_model

        # what a PEFT user writes for LoRA on gate+up; PEFT rewrites it to gate_up_proj at rank 16
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["gate_proj", "up_proj"]))
    return model.train(), [p for p in model.parameters() if p.requires_grad]
