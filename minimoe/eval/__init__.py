"""Evaluation behind ``eval.py``: the benchmarks as objects in a registry (``tasks``), the runners that
score a model on them (``runners``: generation, option log-likelihood, perplexity), the graders
(``scoring``) and the sandbox generated programs run in (``sandbox``)."""
