"""``ResizableLoRAExpert``: per-expert, resizable LoRA on one projection of a layer's stacked experts.

It owns the frozen base weight under the key the plain layer uses (``experts.gate_proj.weight``).
Adapter weights are fp32 (master weights); compute runs in the activations' dtype. Scaling
``alpha / r`` is fixed when the adapter is created and never changes with rank, so growing never
rescales what was learned.

Storage: expert e owns a list of *chunks* ``A_c [r_c, in]``, ``B_c [out, r_c]`` (one per growth event),
so ``r_e = Σ_c r_c`` and the trainable count is exactly ``Σ_e r_e · (in + out)``. A pruned expert owns
nothing. Growth appends a chunk — a new tensor, which a stock torch optimizer treats as freshly created
(see ``optim.py``) — and pruning deletes chunks. The chunk sizes are the layout its ``spec()`` records
(adapter files store each expert's chunks concatenated; training checkpoints store them by parameter).

Compute (shape legend: R routed rows sorted by expert, E experts, E_a adapted experts (rank > 0),
r_pad = max rank rounded up to 8): chunks are packed each step into ``A_pad [E, r_pad, in]`` /
``Bᵀ_pad [E, r_pad, out]`` (zero rows where an expert has fewer ranks; a few MB) by one ``index_copy``,
then two grouped matmuls give the delta ``(R, out)``; gradients flow back through the packing. Once
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
from .base import Adapter, on_meta
from .lora import check_scaling, kaiming_rows, orthogonal_rows
from ..model.moe import Groups, StackedLinear, _compute_dtype, grouped_linear, use_grouped_mm


class _ExpertChunks(nn.Module):
    """The LoRA chunks of one expert: ``A[c] (r_c, in)``, ``B[c] (out, r_c)``."""

    def __init__(self):
        super().__init__()
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()

    @property
    def rank(self) -> int:
        return sum(a.shape[0] for a in self.A)


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
    or only the adapted ones when skipping); ``slots (Σr,)``: row of each chunk row in the flattened
    ``[groups · r_pad]`` buffer. When skipping, on the device: ``adapted (E_a,)`` long, the adapted
    experts (an index, not a bool mask: boolean indexing would sync), and ``pruned (E,)`` uint8, 1 for a
    rank-0 expert (the partition's sort key); both None otherwise."""

    key: tuple
    experts: list[int]
    groups: int
    slots: torch.Tensor
    r_pad: int
    adapted: torch.Tensor | None
    pruned: torch.Tensor | None

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
    base_type = StackedLinear
    base_keys = ("weight",)
    required = ("rank", "alpha", "ranks")

    def __init__(self, base: StackedLinear, rank: int, alpha: float, ranks: list[int] | None = None,
                 generator: torch.Generator | None = None, chunks: list[list[int]] | None = None):
        """Every expert at ``rank`` (or at ``ranks[e]``, 0 = none; or with the chunk sizes ``chunks[e]``)."""
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.num_experts, self.in_features, self.out_features = base.num_experts, base.in_features, base.out_features
        self.weight = base.weight
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self._packing: _Packing | None = None  # layout cache, rebuilt after every resize
        if chunks is None:
            chunks = [[r] if r else [] for r in (ranks if ranks is not None else [rank] * self.num_experts)]
        self.set_chunk_layout(chunks)
        if not on_meta(base.weight):
            self.reset_adapter_parameters(generator)

    @torch.no_grad()
    def reset_adapter_parameters(self, generator: torch.Generator | None = None) -> None:
        """Fresh A rows (Kaiming-uniform, drawn expert by expert) and zero B, in the current layout."""
        for chunks in self.lora:
            for a, b in zip(chunks.A, chunks.B, strict=True):
                a.copy_(kaiming_rows(a.shape[0], self.in_features, generator))
                b.zero_()

    # --- layout ------------------------------------------------------------------------------
    @property
    def ranks(self) -> torch.Tensor:
        """``LongTensor [E]``: the rank of every expert (0 = no adapter)."""
        return torch.tensor([chunks.rank for chunks in self.lora], dtype=torch.long)

    def rank_of(self, expert: int) -> int:
        return self.lora[expert].rank

    def lora_A_of(self, expert: int) -> torch.Tensor:
        """Expert e's A ``(r_e, in)`` (its chunks concatenated)."""
        chunks = self.lora[expert]
        return torch.cat(list(chunks.A), 0) if len(chunks.A) else self.weight.new_zeros(0, self.in_features).float()

    def lora_B_of(self, expert: int) -> torch.Tensor:
        chunks = self.lora[expert]
        return torch.cat(list(chunks.B), 1) if len(chunks.B) else self.weight.new_zeros(self.out_features, 0).float()

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for chunks in self.lora for p in (*chunks.A, *chunks.B)]

    def num_adapter_parameters(self) -> int:
        return int(self.ranks.sum()) * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        r = self.ranks
        return (f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, "
                f"ranks={r.tolist()}, scaling={self.scaling:g}")

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        y = grouped_linear(x, self.weight, groups)
        if not any(len(chunks.A) for chunks in self.lora):
            return y
        return y + self.lora_delta(x, groups).to(y.dtype)

    def lora_delta(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """``s · B_e A_e x`` for each row's expert e: ``(R, in) → (R, out)``; 0 on rows of rank-0 experts."""
        dtype = _compute_dtype(x, self.weight)
        if not use_grouped_mm(x, self.weight, groups.implementation):
            return self._delta_loop(x.to(dtype), groups, dtype)
        plan = self._plan()
        if not plan.experts:
            return x.new_zeros(x.shape[0], self.out_features, dtype=dtype)
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
            if self.lora[e].rank == 0:
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
            ranks = [chunks.rank for chunks in self.lora]
            experts = [e for e, r in enumerate(ranks) if r]  # the adapted experts, in order
            r_pad = max(8, -(-max(ranks) // 8) * 8)  # multiple of 8: 16-byte rows for grouped_mm
            pruned = self.num_experts - len(experts)
            skip = bool(experts) and pruned > 0 and pruned >= self.skip_pruned_fraction * self.num_experts
            packed = experts if skip else list(range(self.num_experts))  # experts that get a slot
            slots = torch.cat([torch.arange(ranks[e], dtype=torch.long) + j * r_pad for j, e in enumerate(packed)])
            adapted = torch.tensor(experts, device=device) if skip else None
            pruned_key = torch.tensor([r == 0 for r in ranks], dtype=torch.uint8, device=device) if skip else None
            self._packing = _Packing(key, experts, len(packed), slots.to(device), r_pad, adapted, pruned_key)
        return self._packing

    def _packed(self, plan: _Packing, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``A_pad [G, r_pad, in]`` and ``Bᵀ_pad [G, r_pad, out]`` from the chunks (differentiable),
        G = ``plan.groups`` (all E experts, or only the adapted ones on the skip path)."""
        a_flat = torch.cat([a for chunks in self.lora for a in chunks.A], 0)  # (Σr, in)
        bt_flat = torch.cat([b.t() for chunks in self.lora for b in chunks.B], 0)  # (Σr, out)
        G, r_pad = plan.groups, plan.r_pad
        a_pad = a_flat.new_zeros(G * r_pad, self.in_features).index_copy(0, plan.slots, a_flat)
        bt_pad = bt_flat.new_zeros(G * r_pad, self.out_features).index_copy(0, plan.slots, bt_flat)
        return (a_pad.view(G, r_pad, self.in_features).to(dtype),
                bt_pad.view(G, r_pad, self.out_features).to(dtype))

    # --- resizing ----------------------------------------------------------------------------
    def _append(self, expert: int, a: torch.Tensor) -> list[nn.Parameter]:
        device = self.weight.device  # the meta device too: a meta build gets storage with to_empty
        pa = nn.Parameter(a.to(device=device, dtype=torch.float32))
        pb = nn.Parameter(torch.zeros(self.out_features, a.shape[0], device=device))
        self.lora[expert].A.append(pa)
        self.lora[expert].B.append(pb)
        self._packing = None
        return [pa, pb]

    def prune(self, experts, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the whole LoRA of ``experts`` (their parameters leave the module and the optimizer)."""
        for e in self._check_experts(experts):
            chunks = self.lora[e]
            if optimizer is not None:
                optim.remove_params(optimizer, [*chunks.A, *chunks.B])
            self.lora[e] = _ExpertChunks()
        self._packing = None

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
            if self.lora[int(e)].rank + dr > cap:
                raise ValueError(f"grow: expert {e} would reach rank {self.lora[int(e)].rank + dr} > min(in, out) = {cap}")

    def grow(self, deltas: dict[int, int], optimizer: torch.optim.Optimizer | None = None,
             generator: torch.Generator | None = None, group: dict | None = None) -> None:
        """Give expert e ``deltas[e]`` more ranks: new A rows Kaiming-uniform, projected onto the
        orthogonal complement of e's existing A rows; new B rows zero (the output is unchanged).
        New parameters join ``group`` (default: the group of this module's adapter parameters; when every
        expert was pruned there are none, so pass it, as ``model.grow_expert_lora`` does). All-or-nothing:
        an impossible request raises before anything changes."""
        self.check_grow(deltas)
        if optimizer is not None and group is None:
            group = optim.find_group(optimizer, self.adapter_parameters())
            if group is None and len(optimizer.param_groups) > 1:
                raise ValueError("grow: this module has no parameters left in the optimizer to tell which of its "
                                 f"{len(optimizer.param_groups)} param groups the new ranks belong to; pass group=")
        new = []
        for e, dr in deltas.items():
            existing = self.lora_A_of(int(e)).detach().float().cpu()
            new += self._append(int(e), orthogonal_rows(kaiming_rows(dr, self.in_features, generator), existing))
        if optimizer is not None and new:
            optim.add_params(optimizer, new, group)

    def check_shrink(self, deltas: dict[int, int]) -> None:
        """Raise, changing nothing, if ``shrink(deltas)`` is not possible."""
        self._check_experts(deltas)
        for e, dr in deltas.items():
            if not 0 < dr <= self.lora[int(e)].rank:
                raise ValueError(f"shrink: expert {e} has rank {self.lora[int(e)].rank}, cannot remove {dr}")

    def shrink(self, deltas: dict[int, int], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the newest ``deltas[e]`` ranks of expert e (whole chunks, or a slice of the last one).
        ``grow`` then ``shrink`` by the same amounts restores parameters and optimizer state exactly.
        All-or-nothing like ``grow``."""
        self.check_shrink(deltas)
        for e, dr in deltas.items():
            e = int(e)
            chunks = self.lora[e]
            A, B = list(chunks.A), list(chunks.B)
            while dr:
                a, b = A[-1], B[-1]
                if a.shape[0] <= dr:
                    if optimizer is not None:
                        optim.remove_params(optimizer, [a, b])
                    A.pop(), B.pop()
                    dr -= a.shape[0]
                else:
                    keep = torch.arange(a.shape[0] - dr)
                    A[-1] = optim.slice_param(optimizer, a, keep, dim=0)
                    B[-1] = optim.slice_param(optimizer, b, keep, dim=1)
                    dr = 0
            chunks.A, chunks.B = nn.ParameterList(A), nn.ParameterList(B)
        self._packing = None

    def chunk_layout(self) -> list[list[int]]:
        """Rows of every chunk of every expert: what must be rebuilt before loading saved weights."""
        return [[a.shape[0] for a in chunks.A] for chunks in self.lora]

    def set_chunk_layout(self, layout: list[list[int]]) -> None:
        """Recreate the chunk structure ``layout`` (values zero; load a state dict afterwards)."""
        if len(layout) != self.num_experts:
            raise ValueError(f"layout has {len(layout)} experts, the layer has {self.num_experts}")
        self.lora = nn.ModuleList(_ExpertChunks() for _ in range(self.num_experts))
        for e, sizes in enumerate(layout):
            for r in sizes:
                self._append(e, torch.zeros(r, self.in_features, device=self.weight.device))
        self._packing = None  # also when the layout has no chunk at all

    def _check_experts(self, experts) -> list[int]:
        experts = [int(e) for e in experts]
        bad = [e for e in experts if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"expert indices {bad} out of range 0..{self.num_experts - 1}")
        return experts

    # --- protocol (adapters/base.py) -------------------------------------------------------------------
    def spec(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "scaling": self.scaling, "ranks": self.ranks.tolist(),
                "chunks": self.chunk_layout()}

    @classmethod
    def from_spec(cls, base, spec, generator=None) -> ResizableLoRAExpert:
        return cls(base, spec["rank"], spec["alpha"], ranks=spec["ranks"], generator=generator,
                   chunks=spec.get("chunks"))  # files written before chunks were recorded: one per expert

    @classmethod
    def check_spec(cls, base, spec) -> str | None:
        if len(spec["ranks"]) != base.num_experts:
            return f"lists {len(spec['ranks'])} ranks for {base.num_experts} experts"
        chunks = spec.get("chunks")
        if chunks is not None and [sum(c) for c in chunks] != list(spec["ranks"]):
            return f"chunks {chunks} do not add up to the ranks {spec['ranks']}"
        return check_scaling(spec)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Each adapted expert's A and B, its chunks concatenated: ``lora_A.{e} [r_e, in]``, ``lora_B.{e}``."""
        out = {}
        for e in range(self.num_experts):
            if self.rank_of(e):
                out[f"lora_A.{e}"], out[f"lora_B.{e}"] = self.lora_A_of(e), self.lora_B_of(e)
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
        for e, chunks in enumerate(self.lora):
            if len(chunks.A):
                sizes = [a.shape[0] for a in chunks.A]
                for a, part in zip(chunks.A, tensors[f"lora_A.{e}"].split(sizes, 0), strict=True):
                    a.copy_(part)
                for b, part in zip(chunks.B, tensors[f"lora_B.{e}"].split(sizes, 1), strict=True):
                    b.copy_(part)

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
