"""The command lines, the top floor: ``minimoe SUBCOMMAND`` (``main``: the dispatcher) and the two commands the
project exists for, ``train`` and ``eval`` (the other subcommands are ``minimoe.tools``). In a clone,
``python train.py`` and ``python eval.py`` are the same commands."""

from .main import COMMANDS, main

__all__ = ["COMMANDS", "main"]
