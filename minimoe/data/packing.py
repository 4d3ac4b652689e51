"""How examples become rows, for data whose lengths vary: exact packing and length-grouped batches.

Padding each batch to its longest row spends compute on padding; long-tailed data (most examples short, a few
long) pays most. Two remedies:

* **Packing** (``--packing``): whole examples are concatenated into rows of at most ``max_len`` tokens, and
  each row remembers where its examples start. The batch's ``position_ids`` restart at 0 at every start, which
  the model reads as separate documents (block-diagonal causal attention, RoPE positions from 0:
  ``model.AttentionMask.build``), so every token's logits, loss and routing are those of its example alone.
  The first token of an example is never a target (it would be predicted from the previous example).
* **Length grouping** (``--group-by-length``): batches keep their number of examples (the papers' batch
  semantics) but are drawn from length-sorted chunks, so the examples of one batch have similar lengths.

Shapes: a packed row is ``(ids, labels, starts)``; ``starts`` the offsets of its examples (``starts[0] == 0``).
"""

from __future__ import annotations

import random

import torch

MEGA = 50  # length grouping sorts chunks of this many batches (the transformers Trainer's megabatch factor)


def pack(examples: list[tuple[list[int], list[int]]], max_len: int, seed: int) -> list[tuple[list, list, list]]:
    """Whole examples, in a seeded shuffled order, greedily concatenated into rows of at most ``max_len``
    tokens (an example never spans two rows: encoding has already truncated it to ``max_len``)."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    rows, ids, labels, starts = [], [], [], []
    for e_ids, e_labels in order:
        if ids and len(ids) + len(e_ids) > max_len:
            rows.append((ids, labels, starts))
            ids, labels, starts = [], [], []
        starts.append(len(ids))
        # the first token of an example is not predicted from the end of the one before it
        ids, labels = ids + e_ids, labels + ([-100] + e_labels[1:] if ids else e_labels)
    rows.append((ids, labels, starts))
    return rows


def position_ids(rows: list[tuple], width: int) -> torch.Tensor:
    """``(B, width)`` positions of packed rows: 0, 1, ... from each example's start; padding 0."""
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, _, starts) in enumerate(rows):
        for s, e in zip(starts, [*starts[1:], len(ids)], strict=True):
            pos[i, s:e] = torch.arange(e - s)
    return pos


def length_grouped(order: list[int], lengths: list[int], group: int, generator: torch.Generator) -> list[int]:
    """``order`` rearranged so that every consecutive ``group`` indices (one global batch) have similar lengths:
    chunks of ``MEGA`` batches are sorted by length (longest first), cut into batches, and the batches shuffled
    (seeded by ``generator``) so long and short ones alternate through the epoch."""
    mega = group * MEGA
    chunks = [sorted(order[i:i + mega], key=lambda j: -lengths[j]) for i in range(0, len(order), mega)]
    batches = [c[i:i + group] for c in chunks for i in range(0, len(c), group)]
    full = [b for b in batches if len(b) == group]
    shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
    return [j for b in shuffled + [b for b in batches if len(b) < group] for j in b]  # a short batch: last
