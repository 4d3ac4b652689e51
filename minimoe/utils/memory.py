"""Peak memory of this process, measured one way for the trainer, the benchmark and the plan check."""

from __future__ import annotations

import torch


def peak_rss() -> int:
    """This process's peak resident set size, in bytes (Linux ``VmHWM``). Not ``getrusage``'s maxrss where
    ``/proc`` has it: that survives ``exec`` and starts at the parent's size, so a process started by a large
    one (a test session holding models) would report the parent's peak. Elsewhere, maxrss."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB
    except (OSError, StopIteration):
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kilobytes elsewhere


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process on ``device``, in MiB: what torch allocated on a GPU, the peak resident set
    on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return peak_rss() / 2**20
