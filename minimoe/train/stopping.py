"""When a run stops before its last step: on request (Ctrl-C, a cluster's signals) and when the loss diverges.

Signals, as a terminal, a cluster or a launcher deliver them:

    SIGINT  (Ctrl-C)                   finish the current step, checkpoint, exit 130 (``INTERRUPTED``)
    SIGTERM (SLURM, Kubernetes,        finish the current step, checkpoint on every process in lockstep, exit 75
             torchrun on shutdown)     (``PREEMPTED``, EX_TEMPFAIL of sysexits.h: "try again", i.e. resume)
    SIGUSR1 (SLURM's --signal)         the same as SIGTERM

A stop asked for on any process stops all at the same step boundary (``Trainer._train`` asks every step). The
same signal often arrives twice within milliseconds (the terminal sends Ctrl-C to torchrun and its workers,
and torchrun passes it on; SLURM signals every process of a step): a repeat is the same request. Only a
second Ctrl-C pressed later (``REPEAT_S``) stops at once, saving nothing of the step in progress; a repeated
SIGTERM never does (the hard stop is SIGKILL). During a checkpoint nothing interrupts: a signal then waits
until the checkpoint is complete.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager

PREEMPTED = 75  # checkpointed on SIGTERM/SIGUSR1: a requeue script resumes the run
INTERRUPTED = 130  # checkpointed (or stopped at once) on Ctrl-C, the shell's code for SIGINT
REPEAT_S = 1.0  # a second Ctrl-C within this many seconds is the first one delivered twice
PREEMPTION = (signal.SIGTERM, signal.SIGUSR1)


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class StopRequests:
    """The signals above, handled for the duration of a ``with`` block (in the main thread; elsewhere signals
    cannot be handled and keep their defaults). ``say``: prints a line for the user (one process's)."""

    SIGNALS = (signal.SIGINT, *PREEMPTION)

    def __init__(self, say=print):
        self.say = say
        self.signum: int | None = None  # the first signal received here
        self._first_at = 0.0
        self._saving = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def preempted(self) -> bool:
        return self.signum in PREEMPTION

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            try:  # (a handler that prints while the main thread prints: Python refuses the reentrant write)
                self.say("\nCtrl-C: finishing this step, then saving (press again to stop at once)"
                         if signum == signal.SIGINT else f"\n{signal_name(signum)}: finishing this step, then "
                         f"saving a checkpoint (exit status {PREEMPTED}: resume the run)")
            except RuntimeError:
                pass
            return
        if signum in PREEMPTION and self.signum == signal.SIGINT:
            self.signum = signum  # a preemption after a Ctrl-C: the exit status says "resume"
        if self._saving or signum != signal.SIGINT or now - self._first_at < REPEAT_S:
            return  # the same request again, or a checkpoint in progress: it completes first
        raise KeyboardInterrupt  # Ctrl-C pressed again: stop at once

    @contextmanager
    def saving(self):
        """A checkpoint in progress: signals wait until it is complete."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False


class DivergenceWatch:
    """Whether the loss has diverged: it stayed above ``factor`` × the median of the last 20 losses that were
    not (and 0.5 above it) for ``patience`` steps. Every process sees the same (global) loss, so all decide
    alike. ``streak``: the steps in a row the loss has been above (no checkpoint is taken during one)."""

    def __init__(self, factor: float, patience: int):
        self.factor, self.patience = factor, patience
        self.history: list[float] = []
        self.streak = 0

    def diverged(self, loss: float) -> float | None:
        """The running median the loss diverged from, once the streak reaches ``patience``; else None."""
        if self.factor <= 0 or loss != loss or loss in (float("inf"), float("-inf")):
            return None
        if self.history:
            median = sorted(self.history)[len(self.history) // 2]
            if loss > self.factor * median and loss > median + 0.5:
                self.streak += 1
                return median if self.streak >= self.patience else None
        self.streak = 0
        self.history.append(loss)
        del self.history[:-20]
        return None

    def check(self, loss: float, step: int, checkpoint) -> tuple[dict, str] | None:
        """Once the loss has diverged: its ``divergence`` event and the message the run stops with (the last
        checkpoint, ``checkpoint``, is kept: it is from before the loss rose); else None."""
        median = self.diverged(loss)
        if median is None:
            return None
        kept = (f"the last checkpoint, from before the loss rose, is {checkpoint}" if checkpoint.exists()
                else "no checkpoint was written")
        event = {"event": "divergence", "step": step, "loss": loss, "median": median, "streak": self.streak}
        return event, (f"the loss diverged: {loss:.4g} at step {step}, above {self.factor:g} x its running median "
                       f"{median:.4g} for {self.streak} steps; stopping without saving ({kept}). Try a lower --lr "
                       "or --max-grad-norm, or --divergence-factor 0 to train on.")
