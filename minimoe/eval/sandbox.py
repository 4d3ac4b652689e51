"""Run generated programs (HumanEval / MBPP) in a child process, never in the evaluating one.

Each program runs as ``python -I`` in a fresh temporary working directory, in its own session and
process group, with a wall-clock limit, a CPU-time limit, an address-space limit (``RLIMIT_AS``), a
file-size limit, a minimal environment and no stdin. Its stdout is discarded and its stderr goes to a
file of which only the tail is read, so nothing it prints can fill the evaluator's memory, and the
evaluator waits for the child alone (a grandchild holding a pipe cannot stall it). When the child ends
or times out, its process group and every process that still carries this run's environment marker
are killed. A program passes only if it exits 0 *after* its tests ran: a bootstrap writes a random
token to a random file name once the program returns, so ``sys.exit(0)``/``os._exit(0)`` before the
tests fails. Outcome: ``passed``, ``failed``, ``timeout`` or ``memory``. This isolates crashes, hangs,
memory hogs and stray children; it is not a security boundary against hostile code (no process-count
limit for root, no network or filesystem isolation): run untrusted models' output in a container too.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    status: str  # passed | failed | timeout | memory
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def humaneval_program(problem: dict, completion: str) -> str:
    """HumanEval: prompt + completion, then the problem's tests and ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def mbpp_program(problem: dict, completion: str) -> str:
    """MBPP: the generated code, the setup code and the imports the tests need (sanitized MBPP's
    ``test_imports``), then the asserts of ``test_list``."""
    tests = "\n".join(problem.get("test_list", []))
    imports = "\n".join(problem.get("test_imports", []))
    return f"{completion}\n\n{problem.get('test_setup_code', '')}\n{imports}\n{tests}\n"


# Runs in the child before the program: limits first, then the program as __main__, then the token.
_BOOT = """\
import resource, runpy, sys
for name, value in {limits!r}:
    resource.setrlimit(getattr(resource, name), (value, value))
runpy.run_path("program.py", run_name="__main__")
with open({marker!r}, "w") as f:
    f.write({token!r})
"""
STDERR_TAIL = 2000  # characters of stderr kept in a result's detail


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has exited
    except OSError:
        return False


def _kill_stragglers(pgid: int, marker: str, grace: float = 2.0) -> None:
    """SIGKILL the child's process group and (Linux) any process whose environment carries ``marker``,
    then wait (up to ``grace`` seconds) until they have stopped, so none outlives the run."""
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


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16) -> Result:
    """Execute ``source`` under the limits above and classify the outcome."""
    marker, token = secrets.token_hex(8), secrets.token_hex(16)
    done_file = f"done-{secrets.token_hex(8)}"
    cpu = int(timeout) + 1
    limits = [("RLIMIT_CPU", cpu), ("RLIMIT_AS", memory_mb * 2**20), ("RLIMIT_CORE", 0),
              ("RLIMIT_FSIZE", max_file_mb * 2**20)]
    with tempfile.TemporaryDirectory(prefix="minimoe-exec-") as work:
        (Path(work) / "program.py").write_text(source)
        boot = _BOOT.format(limits=limits, marker=done_file, token=token)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "MINIMOE_SANDBOX": marker}
        with open(Path(work) / ".stderr", "wb") as err_file:
            proc = subprocess.Popen([sys.executable, "-I", "-c", boot], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_file,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_stragglers(proc.pid, marker)
                proc.wait()
                return Result("timeout", f"killed after {timeout:g} s")
            finally:
                _kill_stragglers(proc.pid, marker)
        with open(Path(work) / ".stderr", "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4 * STDERR_TAIL))
            err = f.read().decode(errors="replace")[-STDERR_TAIL:]
        finished = (Path(work) / done_file).is_file() and (Path(work) / done_file).read_text() == token
        if proc.returncode == 0 and finished:
            return Result("passed")
        if proc.returncode == 0:
            return Result("failed", "exited before its tests finished (sys.exit/os._exit)")
        if "MemoryError" in err or proc.returncode == -signal.SIGKILL:
            return Result("memory", err[-500:])
        if proc.returncode == -signal.SIGXCPU:
            return Result("timeout", "CPU time limit")
        return Result("failed", err[-500:])
