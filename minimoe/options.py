"""Options as dataclass fields that carry their ``--help`` text and choices, and the argparse flags made
from them: one definition for the defaults, the command line, TOML files and the checks.

``TrainConfig`` (``train/config.py``) and every policy's ``Config`` declare their fields with ``option``;
``add_arguments`` turns a dataclass into flags (``--max-len``, ``--epng-alpha``) whose values are None
unless given, so that merging layers (defaults < TOML < command line) can tell "given" from "default".
"""

from __future__ import annotations

import argparse
import dataclasses


def option(default, help: str, choices: tuple | None = None, cli: bool = True):
    """A field with its default (the paper's, where there is one), the ``--help`` text, and the values it
    may take. ``cli=False``: not a flag of its own. A dict or list default is copied per instance."""
    metadata = {"help": help, "choices": choices, "cli": cli}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(group, cls, flag_prefix: str = "", dest_prefix: str = "") -> None:
    """A flag for every field of dataclass ``cls`` (``--{flag_prefix}{name}``, dest ``{dest_prefix}{name}``),
    its help text and choices from the field's metadata, default None (given or not)."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True):
            _add_field(group, flag(flag_prefix + f.name), dest_prefix + f.name, f)


def _add_field(group, name: str, dest: str, f: dataclasses.Field) -> None:
    default = default_of(f)
    help_text, choices = f.metadata.get("help", f.name.replace("_", " ")), f.metadata.get("choices")
    metavar = f.name.upper()
    if default == "":  # the help text says what an unset string means
        help_text, default = help_text.replace("%", "%%"), None
    if choices:
        group.add_argument(name, dest=dest, choices=choices, default=None, help=f"{help_text} (default: {default})")
    elif f.type in ("bool", bool):
        group.add_argument(name, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: {default})")
    elif isinstance(default, tuple):
        group.add_argument(name, dest=dest, nargs="+", default=None, metavar="NAME",
                           help=f"{help_text} (default: {' '.join(default)})")
    else:
        group.add_argument(name, dest=dest, type=str if default is None else type(default), default=None,
                           metavar=metavar, help=help_text if default is None else f"{help_text} (default: {default})")


def check_choices(obj, what: str = "") -> None:
    """Raise ValueError naming the flag if a field with choices holds another value."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and value not in choices:
            raise ValueError(f"{what}{flag(f.name)} {value!r}: choose from {', '.join(map(str, choices))}")
