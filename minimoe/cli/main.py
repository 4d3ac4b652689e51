"""The ``minimoe`` command: ``minimoe SUBCOMMAND [flags]`` runs one of the package's commands, each a module
with a ``main(argv) -> int``: ``train`` and ``eval`` beside this module, the others in ``minimoe.tools``
(``python -m minimoe`` is the same; ``minimoe SUBCOMMAND --help`` shows its flags).
A subcommand's module is imported only when it runs, so ``minimoe train`` never loads the benchmark's code."""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module, what it does); the modules' own docstrings say more (their --help)
COMMANDS = {
    "train": ("minimoe.cli.train", "fine-tune with a policy: epng, dmep, lora, esft, full"),
    "eval": ("minimoe.cli.eval", "score a model, a model + adapter or a merged export on a benchmark"),
    "export": ("minimoe.tools.export_adapter", "write an adapter as a merged checkpoint or a PEFT adapter"),
    "convert": ("minimoe.tools.convert", "convert a Hub checkpoint to minimoe's stacked-experts layout"),
    "plan": ("minimoe.tools.plan", "the memory a run needs, per GPU, before it runs"),
    "plan-check": ("minimoe.tools.plan_check", "the plan against a measured run on this CPU"),
    "bench": ("minimoe.tools.bench.run", "training-step throughput and memory next to transformers + PEFT"),
    "check": ("minimoe.tools.check", "the self-check of a device: parity, bf16, the expert paths, resume"),
    "plots": ("minimoe.tools.plots", "the figures of a run directory (loss, events, the papers' figures)"),
    "reproduce": ("minimoe.tools.reproduce", "the papers' tables and analyses (--suite) in miniature, over seeds"),
    "scaling": ("minimoe.tools.scaling", "throughput of one run over 1, 2, ... processes (torchrun)"),
    "tiny": ("minimoe.tools.tiny", "pretrain the shipped tiny models (tiny-moe, tiny-dense)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: minimoe SUBCOMMAND [flags]   (minimoe SUBCOMMAND --help: its flags)\n\nsubcommands:\n"
            + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"minimoe {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"minimoe: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest)
    except BrokenPipeError as e:  # the reader of the output went away (minimoe ... | head): one line, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so the exit's flush is silent too)
        print(f"minimoe {name}: stopped, its output pipe was closed ({e.strerror})", file=sys.stderr)
        return 128 + 13  # what a shell reports for a process ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
