"""The commands around training and evaluation, each a module with ``main(argv)`` behind ``minimoe SUBCOMMAND``
(``minimoe/cli.py``): the benchmark (``bench/``: its runs, the real-scale part, the transformers reference
routes), the memory plan and its check (``plan``, ``plan_check``), the device self-check (``check``,
``check_numerics``), checkpoint formats (``convert``, ``export_adapter``), the papers in miniature
(``reproduce``, ``plots``, ``scaling``) and the shipped tiny models' pretraining (``tiny``). The library never
imports them; of the commands, only ``minimoe train --plan`` reaches one (``plan``)."""
