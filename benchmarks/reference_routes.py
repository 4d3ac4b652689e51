"""The transformers (+ PEFT) routes of ``minimoe bench``: the reference side of the benchmark, and of the
self-check's parity with transformers.

It lives outside the package, beside the tests: transformers and peft are references for tests and benchmarks,
never imported by ``minimoe/``. The package finds this file in a clone of the repository (or where
``MINIMOE_REFERENCE_ROUTES`` says) through ``minimoe.tools.bench.reference``, and loads it only when a
transformers route runs; the libraries are imported inside its function (the ``bench`` extra installs them).
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
