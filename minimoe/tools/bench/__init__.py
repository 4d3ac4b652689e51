"""``minimoe bench``: training-step throughput and memory, minimoe next to transformers + PEFT in one run.
``run`` is the command and its workers, ``real`` what it needs at real scale (streamed bf16 checkpoints, workers
watched for running out of memory, the cost of an EPnG event), ``reference`` where the transformers/PEFT routes
are found (``benchmarks/reference_routes.py`` of a clone: the package never imports transformers or peft), ``lengths``
one epoch of a file of real lengths (``--data``)."""
