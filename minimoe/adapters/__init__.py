"""Adapters that change shape while they train, each a kind of ``base.Adapter`` (the protocol): plain LoRA
(``lora``), per-expert resizable LoRA (``expert_lora``), a pruned mixture of LoRA experts behind a router
(``lora_moe``), ESFT's selected experts (``selected``) and
linears it trains in full (``trained``: shared experts); the optimizer state that follows every resize
(``optim``); the model-level methods (``attach``); adapter files (``io``); merged and PEFT exports
(``export``). Adapters wrap the network's modules (``minimoe.model``); the network never imports them."""
