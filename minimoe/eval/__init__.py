"""Evaluation behind ``eval.py``: the benchmarks as objects in a registry (``tasks``), the runners that
score a model on them (``runners``: generation, option log-likelihood, perplexity), the graders
(``scoring``), the sandbox generated programs run in (``sandbox``, with its supervisor and bootstrap in
``isolation``) and the progress kept for resuming an evaluation (``progress``)."""
