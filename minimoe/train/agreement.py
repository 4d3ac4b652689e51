"""Every process trains on the same thing: at the start of a run of several processes, each one's tokenised
data, base model and resolved configuration are checked against the first process's.

A file of another version on one machine (200 rows against 300), another checkpoint of the base, a flag given
to one process only: each would train to the end with every replica still in agreement (the gradients are
summed, so the replicas stay identical) and the run would not be the one asked for. Each is refused before
the first step, naming the rank and what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from ..adapters.io import fingerprint


def data_fingerprint(data) -> str:
    """A hash of the tokenised examples (token ids and labels, and packed rows' starts, in order) of a
    ``Dataset``."""
    h = hashlib.sha256()
    for row in data.examples:  # (ids, labels) or, packed, (ids, labels, starts)
        for part in row:
            h.update(np.asarray(part, dtype=np.int64).tobytes())
            h.update(b"|")
        h.update(b";")
    return h.hexdigest()[:16]


def fingerprints(data, model, config) -> dict:
    """What this process trains on, small enough to gather from every process."""
    return {"data": data_fingerprint(data), "examples": len(data), "base": fingerprint(model),
            "config": dataclasses.asdict(config)}


def disagreements(gathered: list[dict]) -> list[str]:
    """One line per process that differs from the first (rank 0), saying what differs."""
    first, lines = gathered[0], []
    for rank, mine in enumerate(gathered[1:], 1):
        if mine["config"] != first["config"]:
            keys = sorted(k for k in first["config"].keys() | mine["config"].keys()
                          if first["config"].get(k) != mine["config"].get(k))
            what = ", ".join(f"{k} {mine['config'].get(k)!r} against {first['config'].get(k)!r}" for k in keys)
            lines.append(f"rank {rank}'s configuration differs from rank 0's: {what}")
        if mine["data"] != first["data"]:
            sizes = (f"{mine['examples']} examples against {first['examples']}" if mine["examples"] != first["examples"]
                     else f"the same number of examples ({first['examples']}), other tokens")
            lines.append(f"rank {rank}'s data differ from rank 0's: {sizes} (--data {first['config']['data']}: "
                         "another version of the file on that machine?)")
        if mine["base"] != first["base"]:
            lines.append(f"rank {rank}'s base model differs from rank 0's (--model {first['config']['model']}: "
                         "another checkpoint on that machine?)")
    return lines


def check(world, data, model, config) -> tuple[str | None, list[str]]:
    """With several processes: this process's base fingerprint (taken while the base is whole) and how the
    processes disagree (empty: they agree). One process: nothing to check, ``(None, [])``."""
    if not world.distributed:
        return None, []
    mine = fingerprints(data, model, config)
    return mine["base"], disagreements(world.gather(mine))
