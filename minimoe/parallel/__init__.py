"""Several processes (``torchrun``): the process group, gradient sums, rank-0 output and failures (``distributed``:
``World``) and sharding the frozen base or the trained weights with FSDP2 (``fsdp``)."""
