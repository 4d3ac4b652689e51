"""``minimoe bench``: training-step throughput and memory, minimoe next to transformers + PEFT in one run.
``run`` is the command and its workers, ``real`` what it needs at real scale (streamed bf16 checkpoints, workers
watched for running out of memory, the cost of an EPnG event), ``reference`` the transformers/PEFT routes (the
only module of minimoe that imports them, inside its functions)."""
