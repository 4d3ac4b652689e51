"""The commands around training and evaluation, each a module with ``main(argv)`` behind ``minimoe SUBCOMMAND``
(``minimoe.cli``): the benchmark (``bench/``: its runs, the real-scale part, real lengths, where the transformers
reference routes are found), the memory plan and its check (``plan``, ``plan_check``), the device self-check (``check``,
``check_numerics``), checkpoint formats (``convert``, ``export_adapter``), the papers in miniature
(``reproduce``, ``plots``, ``scaling``) and the shipped tiny models' pretraining (``tiny``). Only the command
lines (``minimoe.cli``) import them: ``minimoe train --plan`` asks ``plan``."""
