"""The two baselines without routing logic: static LoRA and full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Context, Policy, option


class LoRA(Policy):
    """Static LoRA at a uniform rank on the routed experts (and optionally dense linears)."""

    name = "lora"

    @dataclass
    class Config:
        rank: int = option(8, "LoRA rank (EPnG App. A.2)", low=1)
        lora_alpha: float = option(16.0, "LoRA alpha (scaling alpha/r)", low=0.0)
        targets: tuple[str, ...] = option(("gate_proj", "up_proj"),
                                          "expert projections that get LoRA (gate_proj, up_proj, down_proj)")
        dense_targets: tuple[str, ...] = option((), "dense linears that get LoRALinear too (e.g. q_proj v_proj; "
                                                    "on a dense model: required)")

    def setup(self, model, ctx: Context) -> None:
        g = self.generator
        if model.config.num_experts:
            model.add_expert_lora(self.config.rank, self.config.lora_alpha, self.config.targets, generator=g)
        elif not self.config.dense_targets:
            raise ValueError("policy lora: this model has no MoE layers; set dense_targets "
                             "(e.g. --lora-dense-targets q_proj v_proj)")
        if self.config.dense_targets:
            model.add_lora(self.config.rank, self.config.lora_alpha, self.config.dense_targets, generator=g)

    def trainable_parameters(self, model):
        return model.adapter_parameters()


class Full(Policy):
    """Full fine-tuning: every parameter trains."""

    name = "full"
    trains_base_weights = True

    @dataclass
    class Config:
        pass

    def setup(self, model, ctx: Context) -> None:
        model.requires_grad_(True)
