"""Stalled and vanished peers: which process the others wait for, for how long, and what became of it.

Every training process publishes, through the process group's store (torchrun's TCPStore, which outlives the
workers), under ``minimoe/``:

    peer/R    its host and pid (once)
    beat/R    a heartbeat count, raised every ``period`` seconds by a daemon thread: a stopped (SIGSTOP) or dead
              process stops it, a busy or hung main thread does not
    entered/R how many collectives its main thread has entered (published by the same thread)
    error/R   the error it stopped with, and its exit status (``report_error``, from ``exit_with_error``)

The watchdog thread of each process ends it (``os._exit(1)``) once its main thread has waited inside one
collective for longer than ``--dist-timeout``, naming the ranks it waits for: those whose heartbeat stopped
(stopped or dead), and those that have not entered this collective (alive, but stuck elsewhere: a hung disk
or GPU). A collective that fails because a peer vanished is described the same way (``describe_peers``). The
process group's own timeout is set a little longer, so that this message normally comes first; on NCCL the
process group's watchdog (asynchronous error handling) also aborts a collective at that timeout.

A stalled process is otherwise left to the launcher, which would end it late: torchrun sends it SIGTERM when
another worker fails, which a stopped process does not act on, and SIGKILL only 30 s later. So a peer on the
same host that is stopped by a signal (SIGSTOP: state ``T``, not a debugger's ``t``) is ended with SIGKILL by
the watchdog that names it; a peer on another host is its own launcher's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager

import torch.distributed as dist

from ..utils.processes import alive, state

DEFAULT_TIMEOUT_S = 1800.0  # generous: a first step that compiles, a slow checkpoint on a shared filesystem
LINGER_S = 2.0  # a survivor's wait before it leaves (``leave``): torchrun looks every 0.1 s by default
_current: Watchdog | None = None


def current() -> Watchdog | None:
    """The watchdog of this process (None in one process, or before the process group started)."""
    return _current


class Watchdog:
    def __init__(self, rank: int, size: int, timeout_s: float, store=None):
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.period = max(0.2, min(5.0, timeout_s / 5))
        self.entered = 0  # collectives entered by the main thread
        self._waiting_since: float | None = None  # the main thread is inside a collective since
        # rank: (last heartbeat seen, when it last changed); none seen yet counts from now
        self._beats = {r: (-1, time.monotonic()) for r in range(size) if r != rank}
        self._lock = threading.Lock()  # the store client is used by both threads
        self.host = socket.gethostname()
        self._set(f"peer/{rank}", json.dumps({"host": self.host, "pid": os.getpid()}))
        self._set(f"beat/{rank}", "0")
        self._set(f"entered/{rank}", "0")
        threading.Thread(target=self._run, name="minimoe-watchdog", daemon=True).start()

    # --- the store ------------------------------------------------------------------------------------
    def _set(self, key: str, value: str) -> None:
        with self._lock:
            self.store.set(f"minimoe/{key}", value)

    def _read(self, key: str) -> str | None:
        """A key's value, or None if it is not there (never waits for it)."""
        with self._lock:
            if not self.store.check([f"minimoe/{key}"]):
                return None
            return self.store.get(f"minimoe/{key}").decode()

    # --- the main thread ------------------------------------------------------------------------------
    @contextmanager
    def waiting(self):
        """Around one collective of the main thread."""
        self.entered += 1
        self._waiting_since = time.monotonic()
        try:
            yield
        finally:
            self._waiting_since = None

    def report_error(self, message: str, code: int) -> None:
        """This process stops with ``message``: the others name it when they lose it."""
        try:
            self._set(f"error/{self.rank}", json.dumps({"message": message, "exit_status": code}))
        except Exception:  # the store is gone too: the others say what they can
            pass

    # --- the thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        beat = 0
        while True:  # a daemon thread: it ends with the process
            time.sleep(self.period)
            try:
                beat += 1
                self._set(f"beat/{self.rank}", str(beat))
                self._set(f"entered/{self.rank}", str(self.entered))
                self._see_beats()
            except Exception:  # the store is gone (the launcher stopped): the collectives fail on their own
                return
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self.timeout_s:
                self._stalled(time.monotonic() - since)

    def _see_beats(self) -> None:
        """Note when each peer's heartbeat last changed (two round trips to the store, whatever the size)."""
        now, keys = time.monotonic(), [f"minimoe/beat/{r}" for r in range(self.size) if r != self.rank]
        with self._lock:
            if not self.store.check(keys):  # a peer that never started its watchdog: the others, one by one
                keys = [k for k in keys if self.store.check([k])]
            beats = [int(v) for v in self.store.multi_get(keys)] if keys else []
        for key, beat in zip(keys, beats, strict=True):
            r = int(key.rsplit("/", 1)[1])
            if self._beats[r][0] != beat:
                self._beats[r] = (beat, now)

    def _stalled(self, waited: float) -> None:
        silent = self.describe_peers(waiting_for=self.entered)
        for pid in self._stopped_here():  # ended now, not at the launcher's SIGKILL (torchrun: 30 s later)
            os.kill(pid, signal.SIGKILL)
            silent.append(f"process {pid}, stopped (SIGSTOP), was ended with SIGKILL: a stopped process acts on "
                          "no other signal")
        who = "; ".join(silent) if silent else ("every process reached it, but the collective has not completed "
                                                "(the network between them?)")
        leave(f"waited {waited:.0f} s in a collective (--dist-timeout {self.timeout_s:g}) for: {who}; stopping",
              1, self.rank, self.size)

    def _stopped_here(self) -> list[int]:
        """The pids of the other processes on this host that are stopped by a signal (state ``T``; not ``t``,
        a debugger's)."""
        pids = []
        for r in range(self.size):
            peer = json.loads(self._read(f"peer/{r}") or "{}") if r != self.rank else {}
            if peer.get("host") == self.host and peer.get("pid") and state(int(peer["pid"])) == "T":
                pids.append(int(peer["pid"]))
        return pids

    def describe_peers(self, waiting_for: int | None = None) -> list[str]:
        """What became of the other processes, one phrase per rank that is not plainly alive and in step: its
        own error, its process gone (on this host), its heartbeat stopped, or (``waiting_for``: the collective
        this process waits in) not arrived at it."""
        phrases, now = [], time.monotonic()
        for r in range(self.size):
            if r == self.rank:
                continue
            try:
                error = self._read(f"error/{r}")
                peer = json.loads(self._read(f"peer/{r}") or "{}")
                entered = int(self._read(f"entered/{r}") or 0)
            except Exception:
                phrases.append(f"rank {r}: unknown (the store cannot be read)")
                continue
            where = f"pid {peer.get('pid')} on {'this host' if peer.get('host') == self.host else peer.get('host')}"
            changed = self._beats[r][1]
            quiet = now - changed
            if error:
                e = json.loads(error)
                phrases.append(f"rank {r} stopped with exit status {e['exit_status']}: {e['message']}")
            elif peer.get("host") == self.host and peer.get("pid") and not alive(int(peer["pid"])):
                phrases.append(f"rank {r} ({where}) has ended without reporting an error (killed by a signal, e.g. "
                               "SIGKILL or the out-of-memory killer, or it crashed)")
            elif quiet > 3 * self.period:
                phrases.append(f"rank {r} ({where}) is silent: no heartbeat for {quiet:.0f} s (stopped, e.g. "
                               "SIGSTOP, or its machine is unreachable)")
            elif waiting_for is not None and entered < waiting_for:
                phrases.append(f"rank {r} ({where}) is alive but has not reached this collective (its training "
                               "is stuck: a hung disk or GPU?)")
        return phrases


def start(rank: int, size: int, timeout_s: float) -> Watchdog:
    """This process's watchdog (the process group must be started)."""
    global _current
    _current = Watchdog(rank, size, timeout_s)
    return _current


def lost_peers_message() -> str:
    """The survivor's message when a collective failed because a peer is gone: who, and how when it can tell."""
    dog = current()
    phrases = dog.describe_peers() if dog is not None else []  # (a peer publishes its error before it leaves)
    return ("; ".join(phrases) if phrases else "another process stopped (which, and why, could not be told)") + \
        "; stopping too"


def leave(message: str, code: int, rank: int, size: int, lost_peer: bool = False) -> None:
    """End this process of several: the error is published for the others (``report_error``) and for torchrun's
    report (its ``TORCHELASTIC_ERROR_FILE``), printed naming the rank, and the process leaves at once
    (``os._exit``). A process that only lost a peer (``lost_peer``) writes no error file and lingers up to
    ``LINGER_S`` first, for torchrun to see the peer's failure first and name it, not this one, as the root
    cause (torchrun then ends this process with SIGTERM)."""
    if current() is not None and not lost_peer:
        current().report_error(message, code)
    print(f"rank {rank}/{size}: error: {message}", file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and not lost_peer:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": f"rank {rank}/{size}: {message}", "timestamp": int(time.time())}, f)
        except OSError:
            pass
    sys.stdout.flush()
    if lost_peer:
        time.sleep(LINGER_S)
    os._exit(code)
