"""Processes of this host, by pid: whether one still runs, and in what state (the run lock and the watchdog ask)."""

from __future__ import annotations

import os


def state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``R``, ``S``, ``D``, ``T`` stopped by a signal, ``t`` by a debugger,
    ``Z`` zombie, ...); None if there is no such process, ``?`` if it exists but its state cannot be read (another
    user's, or no ``/proc``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # someone else's process: it exists
        return "?"
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped by its parent, does not)."""
    return state(pid) not in (None, "Z")
