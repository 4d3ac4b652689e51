"""Options as dataclass fields that carry their ``--help`` text and choices, and the argparse flags made
from them: one definition for the defaults, the command line, TOML files and the checks.

``TrainConfig`` (``train/config.py``) and every policy's ``Config`` declare their fields with ``option``;
``add_arguments`` turns a dataclass into flags (``--max-len``, ``--epng-alpha``) whose values are None
unless given, so that merging layers (defaults < TOML < command line) can tell "given" from "default".
"""

from __future__ import annotations

import argparse
import dataclasses
import json


def option(default, help: str, choices: tuple | None = None, cli: bool = True, low=None, high=None,
           metavar: str | None = None):
    """A field with its default (the paper's, where there is one), the ``--help`` text, and the values it
    may take (``choices``, or the inclusive range ``low``..``high``). ``cli=False``: not a flag of its own.
    ``metavar``: how ``--help`` names a value. A dict or list default is copied per instance."""
    metadata = {"help": help, "choices": choices, "cli": cli, "low": low, "high": high, "metavar": metavar}
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
        if not f.metadata.get("cli", True):
            continue
        if flag_prefix and f.name.startswith(flag_prefix):  # lora's lora_alpha: --lora-alpha, not --lora-lora-alpha
            _add_field(group, flag(f.name), dest_prefix + f.name, f)
            _add_field(group, flag(flag_prefix + f.name), dest_prefix + f.name, f, hidden=True)  # the old spelling
        else:
            _add_field(group, flag(flag_prefix + f.name), dest_prefix + f.name, f)


def _add_field(group, name: str, dest: str, f: dataclasses.Field, hidden: bool = False) -> None:
    """One flag; its help ends with the field's default unless the text says what the default is, and a
    ``hidden`` flag (an older spelling) is accepted without being listed."""
    default = default_of(f)
    help_text, choices = f.metadata.get("help", f.name.replace("_", " ")), f.metadata.get("choices")
    said = default == "" or "default:" in help_text  # the help text says what the default means
    if hidden:
        help_text = argparse.SUPPRESS
    elif said:
        help_text = help_text.replace("%", "%%")

    def text(shown) -> str:
        return help_text if hidden or said else f"{help_text} (default: {shown})"

    if choices and isinstance(default, tuple):  # several of the choices
        group.add_argument(name, dest=dest, nargs="+", choices=choices, default=None, metavar=f.metadata.get("metavar"),
                           help=text(" ".join(default) or "none"))
    elif choices:
        group.add_argument(name, dest=dest, choices=choices, default=None, help=text(default))
    elif f.type in ("bool", bool):
        group.add_argument(name, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text(default))
    elif isinstance(default, tuple):
        group.add_argument(name, dest=dest, nargs="+", default=None, metavar=f.metadata.get("metavar") or "NAME",
                           help=text(" ".join(default) or "none"))
    else:
        group.add_argument(name, dest=dest, type=str if default == "" else type(default), default=None,
                           metavar=f.name.upper(), help=text(default))


def checked(cls, values: dict, where: str) -> dict:
    """``values`` for dataclass ``cls``, each checked against its field before anything uses it: the type
    of the field's default (an int is a float too; a bool is no number; a tuple takes a list of strings),
    its choices and its range. Returns them converted (lists to tuples, ints to floats); a ValueError names
    ``where`` (e.g. the TOML file or the policy), the key and the value."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        f = fields[key]
        default, meta = default_of(f), f.metadata
        bad = f"{where}{key} = {value!r}"
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, str):
            ok = isinstance(value, str)
        elif isinstance(default, tuple):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            value = tuple(value) if ok else value
        else:
            ok = True
        if not ok:
            raise ValueError(f"{bad}: expected {_kind(default)}")
        if meta.get("choices") and not _chosen(value, meta["choices"]):
            raise ValueError(f"{bad}: choose from {', '.join(map(str, meta['choices']))}")
        if meta.get("low") is not None and value < meta["low"] or meta.get("high") is not None and value > meta["high"]:
            low, high = meta.get("low"), meta.get("high")
            limits = f"at least {low}" if high is None else f"at most {high}" if low is None else f"in {low}..{high}"
            raise ValueError(f"{bad}: must be {limits}")
        out[key] = value
    return out


def _kind(default) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            tuple: "a list of strings"}.get(type(default), type(default).__name__)


def to_toml(tables: dict[str, dict]) -> str:
    """A TOML document of ``{table: {key: value}}`` (strings, numbers, booleans, lists of strings): what a
    run writes as ``config.toml`` so that ``--config`` repeats it."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))  # a JSON string is a TOML basic string

    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in keys.items()]
        lines.append("")
    return "\n".join(lines)


def check_choices(obj, what: str = "") -> None:
    """Raise ValueError naming the flag if a field with choices holds another value."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and not _chosen(value, choices):
            raise ValueError(f"{what}{flag(f.name)} {value!r}: choose from {', '.join(map(str, choices))}")


def _chosen(value, choices) -> bool:
    """Whether ``value`` is one of ``choices`` (a tuple: each of its items is)."""
    return all(v in choices for v in value) if isinstance(value, tuple) else value in choices
