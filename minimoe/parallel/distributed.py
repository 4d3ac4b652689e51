"""Several processes (``torchrun``): who this process is, and the few collectives training needs.

``World.from_env()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and starts the
process group: NCCL with one GPU per process (``cuda:LOCAL_RANK``) on CUDA, gloo on CPU. Without torchrun
(or with one process) it is ``World()``: rank 0 of 1, and every collective below returns its input.

Data parallelism here is written with plain ``torch.distributed`` collectives rather than DDP, because the
trained parameters change shape mid-run (prune/grow/slice): after the backward passes of a step, the
gradients of the trainable parameters are summed across ranks in buckets (``all_reduce_grads``), built
anew from the parameters of that step, so a resize needs no re-wrapping. The loss is normalised by the
*global* number of target tokens before the backward, so summed gradients are exactly the gradient of the
global batch (see ``Trainer.train_step``). What the sum costs against DDP: no overlap of communication
with the backward pass — small for adapter gradients; with ``--fsdp`` fully fine-tuned weights are sharded
and FSDP reduce-scatters their gradients (``fsdp.py``).

Failures: a process that fails reports and leaves at once (``exit_with_error``); on one machine its peers'
collectives fail within a fraction of a second (gloo: connection reset; torchrun also stops them) and they
say which rank is gone and how. A process that stops answering (stopped, hung) is named by the others'
watchdogs once they have waited ``--dist-timeout`` seconds in a collective (``watchdog.py``).
"""

from __future__ import annotations

import datetime
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import watchdog

BUCKET_BYTES = 32 * 2**20  # gradients are summed in flat buckets of about this size


def launched() -> tuple[int, int, int]:
    """``(rank, size, local_rank)`` as torchrun's environment says (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``);
    ``(0, 1, 0)`` without torchrun. The one place the environment is read."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device: str = "", timeout_s: float = watchdog.DEFAULT_TIMEOUT_S) -> World:
        """The world torchrun describes, with its process group and watchdog started (idempotent); ``World()``
        without torchrun. ``device``: the ``--device`` asked for ("" = cuda if available); CUDA gets NCCL, CPU
        gloo. ``timeout_s``: ``--dist-timeout`` (the watchdog's; the process group's is a little longer)."""
        rank, size, local_rank = launched()
        if size <= 1:
            return cls()
        use_cuda = device.startswith("cuda") or (not device and torch.cuda.is_available())
        if not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(local_rank)
            group_timeout = datetime.timedelta(seconds=timeout_s + 30)
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=group_timeout)
        if watchdog.current() is None:
            watchdog.start(rank, size, timeout_s)
        return cls(rank, size, local_rank)

    def print(self, *args, **kwargs) -> None:
        """``print`` on the first process only: one process speaks for all."""
        if self.main:
            print(*args, **kwargs)

    def device(self, asked: str) -> str:
        """The device of this process: ``cuda:LOCAL_RANK`` when training on CUDA with several processes."""
        if self.distributed and (asked.startswith("cuda")):
            return f"cuda:{self.local_rank}"
        return asked

    # --- collectives (identity in one process) -----------------------------------------------------
    def sum(self, value: float | int, device: str = "cpu") -> float:
        """The sum of a number over all processes."""
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        with _waiting():
            dist.all_reduce(t)
            return type(value)(t.item()) if isinstance(value, int) else t.item()

    def sum_all(self, values: list[float], device: str = "cpu") -> list[float]:
        """Each number summed over all processes (one collective; ints stay ints)."""
        if not self.distributed:
            return values
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        with _waiting():
            dist.all_reduce(t)
            totals = t.tolist()
        return [type(v)(x) for v, x in zip(values, totals, strict=True)]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over all processes, in place (returned)."""
        if self.distributed:
            with _waiting():
                dist.all_reduce(t)
        return t

    def any(self, flag: bool, device: str = "cpu") -> bool:
        """Whether any process says yes (e.g. a stop was requested on one of them)."""
        return self.sum(int(bool(flag)), device) > 0

    def gather(self, value, device: str = "cpu") -> list:
        """``value`` of every process, in rank order (picklable objects)."""
        if not self.distributed:
            return [value]
        out = [None] * self.size
        with _waiting():
            dist.all_gather_object(out, value)
        return out

    def all_reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the ``.grad`` of ``params`` (the same list on every process) over all processes, in flat buckets.
        A parameter without a gradient on every process keeps none, as in one process."""
        if not self.distributed:
            return
        # a parameter no token reached on this process has no gradient here but may have one elsewhere: every
        # process must bucket the same tensors, so the pattern is agreed first (zeros where one is missing)
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                           device=params[0].device if params else "cpu")
        with _waiting():
            dist.all_reduce(has)
        for p, n in zip(params, has.tolist(), strict=True):
            if n and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        bucket, size = [], 0
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= BUCKET_BYTES:
                _reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            _reduce_bucket(bucket)
        if grads and grads[0].is_cuda:  # NCCL returns before the sums are done: wait here, where the watchdog looks
            with _waiting():
                torch.cuda.synchronize(grads[0].device)

    def replicas_agree(self, params: list[torch.Tensor]) -> bool:
        """Whether every process holds bit-identical ``params`` (a hash of their bytes, gathered)."""
        if not self.distributed:
            return True
        import hashlib

        h = hashlib.sha256()
        for p in params:
            h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return len(set(self.gather(h.hexdigest()))) == 1

    def barrier(self) -> None:
        if self.distributed:
            with _waiting():
                dist.barrier()

    def finish(self, code: int) -> int:
        """End this process's part: one process returns ``code``; several meet at a barrier, then each leaves
        at once with ``code`` (``os._exit``), without the interpreter's teardown, where the process group's
        C++ destructors can abort ("terminate called without an active exception") when the peers are
        leaving at the same moment. torchrun collects the exit codes."""
        if not self.distributed:
            return code
        self.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _waiting():
    """Around a collective: the watchdog's clock runs while the main thread waits in it."""
    dog = watchdog.current()
    return dog.waiting() if dog is not None else nullcontext()


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        with _waiting():
            dist.all_reduce(flat)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def exit_with_error(message: str, code: int, lost_peer: bool = False) -> int:
    """Report an error and end this process. With several processes (torchrun), the failing one names itself
    and leaves at once (``watchdog.leave``: nothing waits on the others, which torchrun then stops within a
    fraction of a second), so no rank hangs until a collective times out. ``lost_peer``: this process only
    lost another (see ``watchdog.lost_peers_message``)."""
    rank, world, _ = launched()
    if world > 1:
        watchdog.leave(message, code, rank, world, lost_peer)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def lost_peer(e: Exception) -> bool:
    """Whether a collective failed because another process is gone (it has reported its own error)."""
    kinds = tuple(k for k in (getattr(dist, "DistBackendError", None), getattr(dist, "DistNetworkError", None)) if k)
    text = str(e)
    return isinstance(e, kinds) or "Connection reset by peer" in text or "Connection closed by peer" in text
