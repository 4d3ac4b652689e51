"""Several processes (``torchrun``): who this process is, its rank-0 printing and the collectives training needs
(``distributed``: ``World``, the one reader of torchrun's environment), and how the model is spread over the
processes (``strategy``: ``parallelize`` returns the ``Parallel`` the trainer asks; replicated, or the base
sharded with FSDP2 by ``fsdp``)."""
