"""The network, and nothing about adapters or training: configuration and presets (``config``), the decoder
(``model.Transformer``), the MoE block with its grouped expert matmuls (``moe``), what a forward says about
routing (``routing``), Hub/local checkpoints in and out (``hf``), KV-cache generation (``generate``) and the
tokenizer with the checkpoint's chat format (``tokenizer``)."""
