"""Run generated programs (HumanEval / MBPP) in a child process tree, never in the evaluating one.

Each program runs as ``python -I`` in a fresh temporary working directory under a supervisor process
(:mod:`minimoe.eval.isolation`, which says how and why), with a wall-clock limit, a CPU-time limit, an
address-space limit (``RLIMIT_AS``), a file-size limit, a minimal environment and no stdin. Its stdout is
discarded and its stderr goes to a file of which only the tail is read, so nothing it prints can fill the
evaluator's memory. What holds in every mode: the program's parent is the supervisor (a program that kills
its parent fails, the evaluator carries on); every process it starts, ``setsid`` or not, is killed when it
ends; it passes only if its last line (the tests) ran and it exited 0, with a verdict it cannot forge.
Where Linux has Landlock (recorded as ``landlock_abi``), writes outside the temporary directory, TCP and
signals to other processes are refused too; ``sandbox="bwrap"`` adds bubblewrap's namespaces (no network,
no other processes visible, a read-only root). Outcome: ``passed``, ``failed``, ``timeout`` or ``memory``.
This guards against accidents and sloppy or overreaching code; it is not a container for hostile code.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import isolation

SANDBOXES = ("process", "bwrap")  # --sandbox: a supervised process tree, or that tree inside bubblewrap
GRACE = 10.0  # seconds the supervisor may take beyond the program's own limit (start-up, clean-up)


class SandboxUnavailable(ValueError):
    """The isolation asked for cannot be had on this machine (e.g. ``bwrap`` without bubblewrap)."""


@dataclass
class Result:
    status: str  # passed | failed | timeout | memory
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def _bwrap_problem() -> str | None:
    """Why bubblewrap cannot run programs here (None: it can): missing, or refused namespaces."""
    if shutil.which("bwrap") is None:
        return ("--sandbox bwrap needs bubblewrap, and no bwrap command is installed "
                "(e.g. apt-get install bubblewrap), or use --sandbox process")
    with tempfile.TemporaryDirectory(prefix="minimoe-bwrap-") as work:
        try:
            probe = subprocess.run([*isolation.bwrap_argv(work, []), sys.executable, "-I", "-c", "pass"],
                                   capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"--sandbox bwrap: bubblewrap failed to start ({e})"
    if probe.returncode != 0:
        return f"--sandbox bwrap: bubblewrap cannot run programs here: {' '.join(probe.stderr.split())[-300:]}"
    return None


def check_sandbox(sandbox: str) -> None:
    """Raise :class:`SandboxUnavailable` with a one-line reason if ``sandbox`` cannot be used here."""
    if sandbox not in SANDBOXES:
        raise SandboxUnavailable(f"unknown sandbox {sandbox!r} (known: {', '.join(SANDBOXES)})")
    if sandbox == "bwrap" and (problem := _bwrap_problem()):
        raise SandboxUnavailable(problem)


def sandbox_info(sandbox: str) -> dict:
    """What isolates the programs, for summary.json: the mode, and the kernel's Landlock ABI (0: none)."""
    return {"sandbox": sandbox, "landlock_abi": isolation.landlock_abi()}


def humaneval_program(problem: dict, completion: str) -> str:
    """HumanEval: prompt + completion, then the problem's tests and ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def mbpp_program(problem: dict, completion: str) -> str:
    """MBPP: the generated code, the setup code and the imports the tests need (sanitized MBPP's
    ``test_imports``), then the asserts of ``test_list``."""
    tests = "\n".join(problem.get("test_list", []))
    imports = "\n".join(problem.get("test_imports", []))
    return f"{completion}\n\n{problem.get('test_setup_code', '')}\n{imports}\n{tests}\n"


STDERR_TAIL = 2000  # characters of stderr kept in a result's detail


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has exited
    except OSError:
        return False


def _kill_stragglers(pgid: int | None, marker: str, grace: float = 2.0) -> None:
    """Fallback when the supervisor is gone (killed, or stuck): SIGKILL the program's process group and (Linux)
    any process whose environment still carries ``marker``, then wait (up to ``grace`` seconds) until they
    have stopped. The supervisor's own clean-up reaches further (it inherits every orphan)."""
    if pgid:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc = Path("/proc")
    if not proc.is_dir():
        return
    needle, killed = f"MINIMOE_SANDBOX={marker}".encode(), []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ValueError):
            pass  # gone already, or not ours
    deadline = time.monotonic() + grace
    while any(_running(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.01)


def _tail(path: Path) -> str:
    """The last characters of a file that may be huge (a flood) or missing (the program never started)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4 * STDERR_TAIL))
            return f.read().decode(errors="replace")[-STDERR_TAIL:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    """Ask the supervisor to kill the program's tree and leave (SIGTERM); SIGKILL it if it does not."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (ProcessLookupError, PermissionError):
            return
        except subprocess.TimeoutExpired:
            continue


def _supervise(cfg: dict, limit: float) -> tuple[dict | None, str]:
    """Start the supervisor, read its two lines (the program's pid, then its outcome) within ``limit``
    seconds. Returns (outcome, why there is none); a supervisor that is gone or stuck is cleaned up after."""
    work = cfg["work"]
    with open(Path(work) / ".supervisor", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-I", isolation.__file__, "supervise", json.dumps(cfg)], cwd=work,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    lines: list[bytes] = []
    buf, deadline, why = b"", time.monotonic() + limit, ""
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while len(lines) < 2:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    why = f"the supervisor did not answer within {limit:g} s"
                    break
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                *done, buf = (buf + chunk).split(b"\n")
                lines += done
    finally:  # stuck, or we were interrupted (Ctrl-C): it kills the program's tree on SIGTERM
        if proc.poll() is None and len(lines) < 2:
            _stop(proc)
    code = proc.wait()
    proc.stdout.close()
    info = [json.loads(line) for line in lines[:2]]
    if len(info) < 2:
        _kill_stragglers(info[0]["pid"] if info else None, cfg["env"]["MINIMOE_SANDBOX"])
        if not why:
            why = (f"the supervisor was killed by signal {-code} (did the program signal its parent?)" if code < 0
                   else f"the supervisor failed (exit {code}): {_tail(Path(work) / '.supervisor')[-300:]}")
        return None, why
    return info[1], ""


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16,
                sandbox: str = "process", writable=(), confine: bool = True) -> Result:
    """Execute ``source`` under the limits above and classify the outcome.

    Args:
        source: the whole program (code, then its tests).
        timeout: wall-clock seconds (the CPU-time limit is one more).
        memory_mb: address-space limit.
        max_file_mb: largest file it may write (its stderr included).
        sandbox: ``"process"`` or ``"bwrap"`` (:data:`SANDBOXES`).
        writable: directories the program may write besides its own (where Landlock confines writes);
            tests use it to see what a program did.
        confine: apply Landlock where the kernel has it; False shows what holds without it (tests).
    """
    check_sandbox(sandbox)
    cpu = int(timeout) + 1
    limits = [("RLIMIT_CPU", cpu), ("RLIMIT_AS", memory_mb * 2**20), ("RLIMIT_CORE", 0),
              ("RLIMIT_FSIZE", max_file_mb * 2**20)]
    with tempfile.TemporaryDirectory(prefix="minimoe-exec-") as work:
        (Path(work) / isolation.PROGRAM).write_text(source)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "TMPDIR": work, "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "MINIMOE_SANDBOX": secrets.token_hex(8)}
        cfg = {"python": sys.executable, "work": work, "timeout": timeout, "limits": limits, "landlock": confine,
               "writable": [str(Path(w).resolve()) for w in writable], "sandbox": sandbox, "env": env}
        outcome, why = _supervise(cfg, timeout + GRACE)
        err = _tail(Path(work) / isolation.STDERR)
    if outcome is None:
        return Result("timeout" if why.startswith("the supervisor did not answer") else "failed",
                      f"{why}\n{err[-300:]}".strip())
    code = outcome["returncode"]
    if outcome["timed_out"]:
        return Result("timeout", f"killed after {timeout:g} s")
    if code == 0 and outcome["verdict"]:
        return Result("passed")
    if code == 0:
        return Result("failed", "exited before its tests finished (sys.exit/os._exit)")
    if "MemoryError" in err or code == -signal.SIGKILL:
        return Result("memory", err[-500:])
    if code == -signal.SIGXCPU:
        return Result("timeout", "CPU time limit")
    return Result("failed", err[-500:])
