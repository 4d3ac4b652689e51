"""``torch.compile`` per decoder block (torchtitan's pattern), through every prune, grow and slice.

Each block is compiled on its own (``torch.compile(layer)``), not the whole model: the graphs stay small, the
model's forward around them (embedding, loss, routing statistics) stays plain Python, and a resize recompiles
only the blocks whose shapes changed. The compiled blocks run the forwards without a KV cache (training,
scoring); generation, whose shapes change at every token, runs the plain blocks.

Why recompiles stay bounded. Dynamo keys compiled graphs on the code of ``DecoderLayer.forward``, which every
block shares, and guards each graph on what it read: tensor shapes (an adapter's ``lora_A`` is ``[Σr, in]``,
so each new set of ranks is a new shape) and host metadata (which experts are adapted, the padded rank).
Blocks of the same layout share one graph (two: the first block's input needs no gradient); after EPnG's
first event the blocks differ, and an event adds a few graphs, fewer with each event as the adapters' sizes
turn symbolic (measured on tiny-moe, 4 blocks, events every 10 steps: 4 graphs, then 3, 2, 2, 1, 0). The
limit of graphs per code is ``max(RECOMPILE_LIMIT, GRAPHS_PER_BLOCK · blocks)``: past it dynamo would run
the block eagerly, silently, which ``CompileLog`` reports (``eager_frames``).

What keeps the graphs whole (no graph break): grouped_mm in fp32 goes through an opaque custom op
(``moe._grouped_mm_op``), the LoRA-MoE routing protocol uses attributes, not context variables
(``routing.routing_modules``), and a route's layer index is set outside the block.
"""

from __future__ import annotations

import os

import torch
from torch import nn

RECOMPILE_LIMIT = 64  # graphs per code object at least (dynamo's default, 8, is below one model's block count)
GRAPHS_PER_BLOCK = 16  # ... or this many per block: the blocks' layouts diverge with EPnG's events


def compile_layers(model: nn.Module, backend: str | None = None, **options) -> "CompileLog":
    """Compile each of ``model.layers`` (``torch.compile(layer, backend=..., **options)``); the model's forward
    then runs them (``Transformer.compiled_layers``). Call it after the adapters are attached and the model is
    sharded (FSDP), as torchtitan does; later resizes need nothing more. ``backend``: default
    ``$MINIMOE_COMPILE_BACKEND`` or ``"inductor"`` (``"aot_eager"`` traces without generating code: a quick
    check that a model compiles). Returns a ``CompileLog`` started now."""
    limit = max(RECOMPILE_LIMIT, GRAPHS_PER_BLOCK * len(model.layers))
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)  # every code object
    # a resize changes an adapter's parameter shapes: after the first such recompile they are traced with
    # symbolic sizes, so later events reuse the graph unless the layout's structure (padded rank, skipping) changes
    config.force_parameter_static_shapes = False
    backend = backend or os.environ.get("MINIMOE_COMPILE_BACKEND", "inductor")
    model.compiled_layers = [torch.compile(layer, backend=backend, **options) for layer in model.layers]
    return CompileLog()


class CompileLog:
    """What dynamo compiled: new graphs (first compiles and recompiles after a resize) and frames it gave up on
    and runs eagerly (a recompile limit hit, an error it fell back from), since the last ``update`` and since
    the log started (``total``). Dynamo's counters are per process, so the numbers include anything else the
    process compiled meanwhile."""

    def __init__(self):
        self.start = self.last = self._counts()

    @staticmethod
    def _counts() -> tuple[int, int]:
        from torch._dynamo.utils import counters

        frames = counters["frames"]
        return counters["stats"]["unique_graphs"], frames["total"] - frames["ok"]

    @staticmethod
    def _new(now: tuple[int, int], before: tuple[int, int]) -> dict:
        return {"graphs": now[0] - before[0], "eager_frames": now[1] - before[1]}

    def update(self) -> dict | None:
        """``{"graphs": new, "eager_frames": new}`` since the last call, or None if nothing was compiled."""
        now = self._counts()
        new, self.last = self._new(now, self.last), now
        return new if new["graphs"] or new["eager_frames"] else None

    def total(self) -> dict:
        return self._new(self._counts(), self.start)


def compile_line(step: int, new: dict, blocks: int) -> str:
    """What ``CompileLog.update`` found after optimizer step ``step``, as a line for the user."""
    line = (f"step {step}: torch.compile compiled {new['graphs']} graph(s) for the {blocks} blocks" if step <= 1 else
            f"step {step}: torch.compile compiled {new['graphs']} more graph(s) (blocks whose layout a resize "
            "changed, or a new kind of forward)")
    if new["eager_frames"]:
        line += (f"; {new['eager_frames']} block call(s) fell back to eager execution (a recompile limit or an "
                 "error in the compiler: see its warnings above)")
    return line
