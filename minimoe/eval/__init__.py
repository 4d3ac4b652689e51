"""Evaluation behind ``minimoe eval`` (``minimoe.cli.eval``): the benchmarks as objects in a registry
(``tasks``), the runners that score a model on them (``runners``: generation, option log-likelihood,
perplexity), the graders (``scoring``), the sandbox generated programs run in (``sandbox``, with its
supervisor and bootstrap in ``isolation``), the progress kept for resuming an evaluation (``progress``), and
PrefEval (``prefeval``) with the LLM judge it asks (``judge``).

Importing the package registers every task: those of ``tasks`` and PrefEval's (``prefeval`` imports
``tasks``, never the other way round).
"""

from . import prefeval  # noqa: F401  (registers the prefeval task)
