"""A run directory's lock: one run at a time writes ``RUN``.

The lock is a file beside the directory, ``.RUN.lock`` in its parent (inside, it would be cleared with the
directory), created with ``O_EXCL`` so that of two runs started together exactly one gets it. It records its
holder (host, pid, start time) and a heartbeat the holder refreshes every ``LEASE_S / 4`` seconds from a daemon
thread. A lock is live while its heartbeat is younger than ``LEASE_S`` and, on the holder's own host, its
process exists; so on a shared filesystem a run on another machine that died is taken over once its lease has
run out, and on the same machine at once. A live lock is never bypassed, ``--overwrite`` included. Under
torchrun the first process holds it for all.

Not covered: two runs that find the same stale lock in the same instant may both take it over (each removes
the old file, one creates the new one; the other's create then fails, unless it removed the new one first).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from pathlib import Path

from ..utils.processes import alive

LEASE_S = 60.0


class RunLockError(RuntimeError):
    """The run directory is locked by a live run."""


class RunLock:
    def __init__(self, run: str | Path, lease_s: float = LEASE_S):
        run = Path(run)
        self.run, self.lease_s = run, lease_s
        self.path = run.parent / f".{run.name}.lock"
        self._stop: threading.Event | None = None

    def holder(self) -> dict | None:
        """The recorded holder (None without a readable lock)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def live(self, holder: dict) -> bool:
        """Whether ``holder`` still runs (see the module docstring). This process's own lock is not in its way."""
        if holder.get("host") == socket.gethostname():
            return holder.get("pid") != os.getpid() and alive(int(holder.get("pid", -1)))
        return time.time() - float(holder.get("heartbeat", 0)) < self.lease_s

    def describe(self, holder: dict) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"

    def check(self) -> None:
        """Refuse (``RunLockError``, naming the holder) if a live run holds the directory; changes nothing."""
        holder = self.holder()
        if holder is not None and self.live(holder):
            raise RunLockError(f"run directory {self.run} is in use by another run ({self.describe(holder)}; lock "
                               f"{self.path}); wait for it to end, or use another --out")

    def acquire(self) -> str | None:
        """Take the lock, or raise ``RunLockError`` naming its live holder. Returns a line to say when a lock
        left by a run that is gone was taken over."""
        note = None
        for _ in range(3):
            record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                      "heartbeat": time.time(), "run": str(self.run)}
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and self.live(holder):
                    self.check()  # raises, naming it
                if holder is not None and holder.get("pid") != os.getpid():
                    note = f"took over the lock of a run that is gone ({self.describe(holder)})"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self._start_heartbeat()
            atexit.register(self.release)
            return note
        self.check()
        raise RunLockError(f"could not take the lock {self.path} of run directory {self.run}")

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        stop, every = self._stop, self.lease_s / 4

        def beat():
            while not stop.wait(every):
                holder = self.holder()
                if holder is None or holder.get("pid") != os.getpid():
                    return  # taken over or removed: not ours to refresh
                tmp = self.path.with_name(self.path.name + f".{os.getpid()}")
                tmp.write_text(json.dumps({**holder, "heartbeat": time.time()}))
                os.replace(tmp, self.path)

        threading.Thread(target=beat, name="minimoe-run-lock", daemon=True).start()

    def release(self) -> None:
        """Give the lock up (if this process holds it)."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        holder = self.holder()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
