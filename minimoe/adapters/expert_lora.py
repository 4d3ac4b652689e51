"""``ResizableLoRAExpert``: per-expert, resizable LoRA on one projection of a layer's stacked experts.

It owns the frozen base weight under the key the plain layer uses (``experts.gate_proj.weight``).
Adapter weights are fp32 (master weights); compute runs in the activations' dtype. Scaling
``alpha / r`` is fixed when the adapter is created and never changes with rank, so growing never
rescales what was learned.

Storage: one tensor per factor, ``lora_A [Σr, in]`` and ``lora_B [out, Σr]``, the experts' rows one after the
other (expert 0's r_0 rows, then expert 1's, ...; within an expert, oldest first), so ``r_e`` rows belong to
expert e, the trainable count is exactly ``Σ_e r_e · (in + out)`` and a pruned expert owns no row. Growth
inserts rows after the expert's last one, pruning and shrinking remove rows: each builds new tensors with
``optim.reindex_param``, which moves the optimizer state with them. Inserted rows must train as fresh
parameters (step 0, zero moments), hence minimoe's ``AdamW`` (``adamw.py``), which counts steps per row; a
stock optimizer that has already stepped is refused when rows are inserted. Two tensors per projection
(rather than two per expert and growth event) keep the optimizer step and the packing to a few large ops.
Files written before this layout (a tensor per expert and growth "chunk") load as they are.

Compute (shape legend: R routed rows sorted by expert, E experts, E_a adapted experts (rank > 0),
r_pad = max rank rounded up to 8): the rows are packed each step into ``A_pad [E, r_pad, in]`` /
``Bᵀ_pad [E, r_pad, out]`` (zero rows where an expert has fewer ranks; a few MB) by one ``index_copy`` (a
view when every expert has rank r_pad), then two grouped matmuls give the delta ``(R, out)``; gradients flow
back through the packing. Once
enough experts have rank 0 (``skip_pruned_fraction``) their rows skip the LoRA matmuls: only the E_a
adapted experts are packed and their rows are partitioned to the front (``_delta_skip``). The loop
path (reference, CPU fallback) skips experts of rank 0 always.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import optim
from .adamw import mark_rows
from .base import Adapter, on_meta
from .lora import check_scaling, kaiming_rows, orthogonal_rows
from ..model.moe import Groups, StackedLinear, _compute_dtype, grouped_linear, use_grouped_mm


def _scatter_rows(src: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """``out[dest[j]] = src[j]`` for ``src (R, D)``, ``dest (R,)`` in ``0..R``; rows nobody writes are 0
    and writes to ``dest == R`` are dropped (a spare row, sliced off: it may receive several rows)."""
    out = src.new_zeros(src.shape[0] + 1, src.shape[1])
    return out.index_copy_(0, dest, src)[:-1]


def _gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``src[index]`` for ``src (R, D)``, where ``index == R`` picks a row of zeros."""
    return torch.cat([src, src.new_zeros(1, src.shape[1])]).index_select(0, index)


class _ToAdapted(torch.autograd.Function):
    """``xs = x[perm]`` (rows into adapted-first order). Backward scatters the gradient back and drops
    the rows with ``dest == R`` (those past grouped_mm's ``offs[-1]``, whose gradient rows grouped_mm
    leaves unwritten), so pruned rows get exactly 0. Autograd's own backward of ``x[perm]`` would
    scatter-add every row, garbage included."""

    @staticmethod
    def forward(ctx, x, perm, dest):
        ctx.save_for_backward(dest)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (dest,) = ctx.saved_tensors
        return _scatter_rows(grad, dest), None, None


class _FromAdapted(torch.autograd.Function):
    """``out[dest[j]] = ys[j]`` (back to the caller's order): rows with ``dest == R`` (past ``offs[-1]``,
    unwritten by grouped_mm) are dropped and pruned rows, written by nobody, are 0. Backward gathers;
    rows past ``offs[-1]`` get a zero gradient."""

    @staticmethod
    def forward(ctx, ys, dest):
        ctx.save_for_backward(dest)
        return _scatter_rows(ys, dest)

    @staticmethod
    def backward(ctx, grad):
        (dest,) = ctx.saved_tensors
        return _gather_rows(grad, dest), None


@dataclass
class _Packing:
    """Host-side layout of the grouped LoRA path, rebuilt after every resize (no device data read).

    ``experts``: adapted experts (rank > 0); ``groups``: experts with a slot in the padded buffers (all E,
    or only the adapted ones when skipping); ``slots (Σr,)``: row of each ``lora_A`` row in the flattened
    ``[groups · r_pad]`` buffer. When skipping, on the device: ``adapted (E_a,)`` long, the adapted
    experts (an index, not a bool mask: boolean indexing would sync), and ``pruned (E,)`` uint8, 1 for a
    rank-0 expert (the partition's sort key); both None otherwise."""

    key: tuple
    experts: list[int]
    slots: torch.Tensor
    adapted: torch.Tensor | None
    pruned: torch.Tensor | None
    dense: bool  # every packed expert has rank r_pad: the flat rows are the padded buffer
    grid: torch.Tensor  # empty [groups, r_pad, 0]: the two sizes kept as a shape, which torch.compile traces as
    # symbolic sizes after they change once (as Python ints, every new padded rank would be a new graph)

    @property
    def groups(self) -> int:
        return self.grid.shape[0]

    @property
    def r_pad(self) -> int:
        return self.grid.shape[1]

    @property
    def skip(self) -> bool:
        return self.adapted is not None


class ResizableLoRAExpert(Adapter):
    """Per-expert LoRA on one projection of a layer's stacked experts; every expert has its own rank.

    ``skip_pruned_fraction`` (default 0.5): on the grouped path, the rows of
    rank-0 experts skip the LoRA matmuls once at least this fraction of the experts has rank 0; below
    it, rank-0 experts are packed as zero rows and their rows run through the matmuls. Why a threshold:
    skipping needs a partition of the rows (a gather of x forward, a scatter of its gradient backward,
    the same for the output), i.e. extra passes over every row, while the rank-r matmuls it saves are
    themselves about one pass over the skipped rows. Measured on CPU (R=4096, in=512, out=256, E=64,
    fp32, forward+backward of the LoRA delta against packing): skipping is 2-25% slower at 25% pruned,
    breaks even near 50% at r_pad 16-32 (near 65% at r_pad 8, where it is ~10% slower at 50%), and is
    10% (r_pad 8) to 40% (r_pad 32) faster at 75%. 0.5 because under EPnG growth lifts r_pad above 8
    from the first event, before half the experts are pruned. The decision reads only the ranks (host
    metadata), never device data. Set the attribute above 1 to never skip, to 0 to skip always.
    """

    skip_pruned_fraction: float = 0.5  # from this fraction of rank-0 experts on, their rows skip

    kind = "expert_lora"
    saves_input = True
    base_type = StackedLinear
    base_keys = ("weight",)
    required = ("rank", "alpha", "ranks")

    def __init__(self, base: StackedLinear, rank: int, alpha: float, ranks: list[int] | None = None,
                 generator: torch.Generator | None = None):
        """Every expert at ``rank`` (or at ``ranks[e]``, 0 = none)."""
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.num_experts, self.in_features, self.out_features = base.num_experts, base.in_features, base.out_features
        self.weight = base.weight
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self._packing: _Packing | None = None  # layout cache, rebuilt after every resize
        self.set_ranks(ranks if ranks is not None else [rank] * self.num_experts)
        if not on_meta(base.weight):
            self.reset_adapter_parameters(generator)

    @torch.no_grad()
    def reset_adapter_parameters(self, generator: torch.Generator | None = None) -> None:
        """Fresh A rows (Kaiming-uniform, drawn expert by expert) and zero B, in the current layout."""
        for e in range(self.num_experts):
            if self._ranks[e]:
                self.lora_A_of(e).copy_(kaiming_rows(self._ranks[e], self.in_features, generator))
        self.lora_B.zero_()

    # --- layout ------------------------------------------------------------------------------
    @property
    def ranks(self) -> torch.Tensor:
        """``LongTensor [E]``: the rank of every expert (0 = no adapter)."""
        return torch.tensor(self._ranks, dtype=torch.long)

    def rank_of(self, expert: int) -> int:
        return self._ranks[expert]

    def _start(self, expert: int) -> int:
        """Row of ``lora_A`` (column of ``lora_B``) where expert e's ranks begin."""
        return sum(self._ranks[:expert])

    def lora_A_of(self, expert: int) -> torch.Tensor:
        """Expert e's A ``(r_e, in)``: a view of its rows of ``lora_A``."""
        start = self._start(expert)
        return self.lora_A[start:start + self._ranks[expert]]

    def lora_B_of(self, expert: int) -> torch.Tensor:
        """Expert e's B ``(out, r_e)``: a view of its columns of ``lora_B``."""
        start = self._start(expert)
        return self.lora_B[:, start:start + self._ranks[expert]]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def saved_bytes(self, rows: int, elt: int) -> int:
        """Over ``rows`` routed rows: ``A x`` at the packed rank r_pad, and the packed A and B in fp32."""
        top = int(self.ranks.max())
        r_pad = max(8, -(-top // 8) * 8) if top else 0
        if not r_pad:
            return 0
        return rows * r_pad * elt + self.num_experts * r_pad * (self.in_features + self.out_features) * 4

    @classmethod
    def summary(cls, named: dict[str, Adapter]) -> list[str]:
        """One row per MoE layer (``layers.{i}.mlp.experts.{target}``): adapted experts, parameters, ranks."""
        first = next(iter(named.values()))
        targets = list(dict.fromkeys(n.rsplit(".", 1)[1] for n in named))
        lines = [f"expert LoRA on {', '.join(targets)} (initial rank {first.rank}, scaling {first.scaling:g})",
                 f"{'layer':>5}  {'adapted':>8}  {'params':>10}  ranks per expert"]
        layers: dict[int, list] = {}
        for name, m in named.items():
            layers.setdefault(int(name.split(".")[1]), []).append(m)
        for i, mods in layers.items():
            ranks = mods[0].ranks
            params = sum(m.num_adapter_parameters() for m in mods)
            lines.append(f"{i:>5}  {int((ranks > 0).sum()):>3}/{len(ranks):<4}  {params:>10,}  "
                         f"{' '.join(str(r) for r in ranks.tolist())}")
        return lines

    def num_adapter_parameters(self) -> int:
        return sum(self._ranks) * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, "
                f"ranks={self._ranks}, scaling={self.scaling:g}")

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        y = grouped_linear(x, self.weight, groups)
        if not self._adapted:
            return y
        return y + self.lora_delta(x, groups).to(y.dtype)

    def lora_delta(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """``s · B_e A_e x`` for each row's expert e: ``(R, in) → (R, out)``; 0 on rows of rank-0 experts."""
        dtype = _compute_dtype(x, self.weight)
        if not use_grouped_mm(x, self.weight, groups.implementation):
            return self._delta_loop(x.to(dtype), groups, dtype)
        if not self._adapted:
            return x.new_zeros(x.shape[0], self.out_features, dtype=dtype)
        plan = self._plan()
        a_pad, bt_pad = self._packed(plan, dtype)
        x = x.to(dtype)
        if not plan.skip:  # every expert packed (pruned ones as zero rows): no gather/scatter
            h = grouped_linear(x, a_pad, groups)  # (R, r_pad)
            return self.scaling * grouped_linear(h, bt_pad.transpose(1, 2), groups)  # (R, out)
        return self.scaling * self._delta_skip(x, groups, a_pad, bt_pad, plan)

    def _delta_skip(self, x: torch.Tensor, groups: Groups, a_pad: torch.Tensor, bt_pad: torch.Tensor,
                    plan: _Packing) -> torch.Tensor:
        """Grouped delta over the adapted experts only: rows of rank-0 experts skip both matmuls.

        Shapes: x ``(R, in)`` sorted by expert; ``a_pad [E_a, r_pad, in]``, ``bt_pad [E_a, r_pad, out]``
        for the E_a adapted experts. No host sync: R is x's length, the adapted experts are host metadata
        (``plan.adapted``, ``plan.pruned`` already on the device), counts and offsets stay on the device.

        A stable partition puts the adapted experts' rows first (still sorted by expert); the grouped
        matmuls run with offsets over those experts only, so the pruned rows lie past ``offs[-1]``, and
        the result is scattered back. grouped_mm leaves its output rows past ``offs[-1]``, and in
        backward its input-gradient rows there, unwritten: uninitialised memory, possibly NaN (on CPU
        too). Neither is ever read: both scatters back drop those rows, and the rows of pruned experts,
        written by nobody, are exactly 0 (a mask multiply would not do: NaN · 0 = NaN). The input rows
        past ``offs[-1]`` need nothing: real rows, ignored.
        """
        R, E, device = x.shape[0], self.num_experts, x.device
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=device), groups.counts, output_size=R)
        perm = torch.argsort(plan.pruned[expert_of_row], stable=True)  # (R,) sorted position → caller row
        sub = Groups.from_counts(groups.counts.index_select(0, plan.adapted), groups.implementation)  # (E_a,)
        live = torch.arange(R, device=device) < sub.offsets[-1]  # (R,) rows grouped_mm computes
        dest = torch.where(live, perm, R)  # (R,) where each sorted row goes back to; R = dropped
        xs = _ToAdapted.apply(x, perm, dest)  # (R, in)
        h = grouped_linear(xs, a_pad, sub)  # (R, r_pad), rows past offs[-1] unspecified
        ys = grouped_linear(h, bt_pad.transpose(1, 2), sub)  # (R, out), rows past offs[-1] unspecified
        return _FromAdapted.apply(ys, dest)  # (R, out) in the caller's order, pruned rows 0

    def _delta_loop(self, x: torch.Tensor, groups: Groups, dtype: torch.dtype) -> torch.Tensor:
        """Reference path: experts of rank 0 are skipped. An adapted expert with no rows still runs (on
        zero rows), so its parameters get a zero gradient as on the grouped path: AdamW then treats them
        the same way (momentum and weight decay still apply) whichever path ran."""
        out = []
        for e, xe in enumerate(x.split(groups.sizes())):
            if self._ranks[e] == 0:
                out.append(xe.new_zeros(xe.shape[0], self.out_features))
                continue
            h = F.linear(xe, self.lora_A_of(e).to(dtype))
            out.append(F.linear(h, self.lora_B_of(e).to(dtype)))
        return self.scaling * torch.cat(out, 0)

    def _plan(self) -> _Packing:
        """The packing layout for the current ranks on the weight's device (host metadata, cached)."""
        device = self.weight.device
        key = (device, self.skip_pruned_fraction)
        if self._packing is None or self._packing.key != key:
            ranks = self._ranks
            experts = [e for e, r in enumerate(ranks) if r]  # the adapted experts, in order
            r_pad = max(8, -(-max(ranks) // 8) * 8)  # multiple of 8: 16-byte rows for grouped_mm
            pruned = self.num_experts - len(experts)
            skip = bool(experts) and pruned > 0 and pruned >= self.skip_pruned_fraction * self.num_experts
            packed = experts if skip else list(range(self.num_experts))  # experts that get a slot
            slots = torch.cat([torch.arange(ranks[e], dtype=torch.long) + j * r_pad for j, e in enumerate(packed)])
            adapted = torch.tensor(experts, device=device) if skip else None
            pruned_key = torch.tensor([r == 0 for r in ranks], dtype=torch.uint8, device=device) if skip else None
            dense = all(ranks[e] == r_pad for e in packed)  # the rows are the padded buffer already
            grid = torch.empty(len(packed), r_pad, 0, device=device)
            self._packing = _Packing(key, experts, slots.to(device), adapted, pruned_key, dense, grid)
        return self._packing

    def _packed(self, plan: _Packing, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_pad [G, r_pad, in]`` and ``Bᵀ_pad [G, r_pad, out]`` from ``lora_A`` / ``lora_B`` (differentiable),
        G = ``plan.groups`` (all E experts, or only the adapted ones on the skip path)."""
        G, r_pad = plan.groups, plan.r_pad
        a, bt = self.lora_A, self.lora_B.t()  # (Σr, in), (Σr, out)
        if plan.dense:  # every packed expert at rank r_pad: no copy for A (Bᵀ: one small transpose copy)
            a_pad, bt_pad = a, bt.contiguous()
        else:
            a_pad = a.new_zeros(G * r_pad, self.in_features).index_copy(0, plan.slots, a)
            bt_pad = bt.new_zeros(G * r_pad, self.out_features).index_copy(0, plan.slots, bt)
        return (a_pad.view(G, r_pad, self.in_features).to(dtype),
                bt_pad.view(G, r_pad, self.out_features).to(dtype))

    # --- resizing ----------------------------------------------------------------------------
    def _relayout(self, ranks: list[int], index: list[int], optimizer: torch.optim.Optimizer | None = None,
                  new_a: torch.Tensor | None = None, group: dict | None = None) -> None:
        """New ``lora_A`` / ``lora_B`` whose row j is the old row ``index[j]`` (-1: a new row, A from ``new_a`` in
        order, B zero), for experts of ``ranks``; the optimizer state follows (``optim.reindex_param``)."""
        index = torch.tensor(index, dtype=torch.long)
        self.lora_A = optim.reindex_param(optimizer, self.lora_A, index, 0, fill=new_a, group=group)
        self.lora_B = optim.reindex_param(optimizer, self.lora_B, index, 1, group=group)
        self._set_layout(ranks)

    def _rows(self, expert: int) -> list[int]:
        start = self._start(expert)
        return list(range(start, start + self._ranks[expert]))

    def prune(self, experts, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the whole LoRA of ``experts`` (their rows leave the factors and the optimizer state)."""
        gone = set(self._check_experts(experts))
        ranks = [0 if e in gone else r for e, r in enumerate(self._ranks)]
        self._relayout(ranks, [i for e in range(self.num_experts) if e not in gone for i in self._rows(e)], optimizer)

    def check_prune(self, experts) -> None:
        """Raise, changing nothing, if ``prune(experts)`` is not possible."""
        self._check_experts(experts)

    def check_grow(self, deltas: dict[int, int]) -> None:
        """Raise, changing nothing, if ``grow(deltas)`` is not possible."""
        self._check_experts(deltas)
        cap = min(self.in_features, self.out_features)
        for e, dr in deltas.items():
            if dr <= 0:
                raise ValueError(f"grow: expert {e} needs a positive rank increase, got {dr}")
            if self._ranks[int(e)] + dr > cap:
                raise ValueError(f"grow: expert {e} would reach rank {self._ranks[int(e)] + dr} > min(in, out) = {cap}")

    def grow(self, deltas: dict[int, int], optimizer: torch.optim.Optimizer | None = None,
             generator: torch.Generator | None = None, group: dict | None = None) -> None:
        """Give expert e ``deltas[e]`` more ranks: new A rows Kaiming-uniform, projected onto the
        orthogonal complement of e's existing A rows; new B rows zero (the output is unchanged). The new
        rows start with zero moments and step 0 (minimoe's ``AdamW``: a stock optimizer that has stepped
        is refused, it would over-step them). ``group``: the param group for the factors if they are not in
        the optimizer yet. All-or-nothing: an impossible request raises before anything changes."""
        self.check_grow(deltas)
        deltas = {int(e): int(dr) for e, dr in deltas.items()}
        fresh = {e: orthogonal_rows(kaiming_rows(dr, self.in_features, generator),  # drawn in the order of deltas
                                    self.lora_A_of(e).detach().float().cpu()) for e, dr in deltas.items()}
        ranks, index, new_a = list(self._ranks), [], []
        for e in range(self.num_experts):
            index += self._rows(e)
            if e in fresh:
                index += [-1] * deltas[e]
                new_a.append(fresh[e])
                ranks[e] += deltas[e]
        self._relayout(ranks, index, optimizer, torch.cat(new_a, 0) if new_a else None, group)

    def check_shrink(self, deltas: dict[int, int]) -> None:
        """Raise, changing nothing, if ``shrink(deltas)`` is not possible."""
        self._check_experts(deltas)
        for e, dr in deltas.items():
            if not 0 < dr <= self._ranks[int(e)]:
                raise ValueError(f"shrink: expert {e} has rank {self._ranks[int(e)]}, cannot remove {dr}")

    def shrink(self, deltas: dict[int, int], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the newest ``deltas[e]`` ranks of expert e (its last rows). ``grow`` then ``shrink`` by the
        same amounts restores parameters and optimizer state exactly. All-or-nothing like ``grow``."""
        self.check_shrink(deltas)
        deltas = {int(e): int(dr) for e, dr in deltas.items()}
        ranks = [r - deltas.get(e, 0) for e, r in enumerate(self._ranks)]
        self._relayout(ranks, [i for e in range(self.num_experts) for i in self._rows(e)[:ranks[e]]], optimizer)

    def set_ranks(self, ranks: list[int]) -> None:
        """Recreate the factors for ``ranks`` (values zero; load a state dict afterwards)."""
        if len(ranks) != self.num_experts:
            raise ValueError(f"layout has {len(ranks)} experts, the layer has {self.num_experts}")
        self._set_layout(ranks)
        device, n = self.weight.device, sum(self._ranks)  # the meta device too: storage comes with to_empty
        self.lora_A = mark_rows(nn.Parameter(torch.zeros(n, self.in_features, device=device)), 0)
        self.lora_B = mark_rows(nn.Parameter(torch.zeros(self.out_features, n, device=device)), 1)

    def _set_layout(self, ranks: list[int]) -> None:
        """The ranks, host metadata: the forward reads only ``_adapted`` and the packing built from them, so that
        ``torch.compile`` guards on a bool and the packing's few ints, not on every expert's rank."""
        self._ranks = [int(r) for r in ranks]
        self._adapted = any(self._ranks)
        self._packing = None
        self._plan()  # now, not in the first (maybe compiled) forward after a resize

    def _check_experts(self, experts) -> list[int]:
        experts = [int(e) for e in experts]
        bad = [e for e in experts if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"expert indices {bad} out of range 0..{self.num_experts - 1}")
        return experts

    # --- protocol (adapters/base.py) -------------------------------------------------------------------
    def spec(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "scaling": self.scaling, "ranks": list(self._ranks)}

    @classmethod
    def from_spec(cls, base, spec, generator=None) -> ResizableLoRAExpert:
        return cls(base, spec["rank"], spec["alpha"], ranks=spec["ranks"], generator=generator)

    @classmethod
    def check_spec(cls, base, spec) -> str | None:
        if len(spec["ranks"]) != base.num_experts:
            return f"lists {len(spec['ranks'])} ranks for {base.num_experts} experts"
        chunks = spec.get("chunks")  # layouts written before the rows were stored flat
        if chunks is not None and [sum(c) for c in chunks] != list(spec["ranks"]):
            return f"chunks {chunks} do not add up to the ranks {spec['ranks']}"
        return check_scaling(spec)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Each adapted expert's A and B: ``lora_A.{e} [r_e, in]``, ``lora_B.{e} [out, r_e]``."""
        out = {}
        for e in range(self.num_experts):
            if self._ranks[e]:
                out[f"lora_A.{e}"] = self.lora_A_of(e).detach().clone()  # own storage, contiguous
                out[f"lora_B.{e}"] = self.lora_B_of(e).detach().clone(memory_format=torch.contiguous_format)
        return out

    @classmethod
    def expected_shapes(cls, base, spec) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for e, r in enumerate(spec["ranks"]):
            if r:
                shapes[f"lora_A.{e}"], shapes[f"lora_B.{e}"] = (r, base.in_features), (base.out_features, r)
        return shapes

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for e in range(self.num_experts):
            if self._ranks[e]:
                self.lora_A_of(e).copy_(tensors[f"lora_A.{e}"])
                self.lora_B_of(e).copy_(tensors[f"lora_B.{e}"])

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = self.weight.float().clone()
        for e in range(self.num_experts):
            if self.rank_of(e):
                w[e] += self.scaling * (self.lora_B_of(e).float() @ self.lora_A_of(e).float())
        return w.to(self.weight.dtype)

    def base_module(self) -> StackedLinear:
        with torch.device("meta"):
            base = StackedLinear(self.num_experts, self.in_features, self.out_features)
        base.weight = self.weight
        return base
