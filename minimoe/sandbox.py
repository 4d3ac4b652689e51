"""Run generated programs (HumanEval / MBPP) in a child process, never in the evaluating one.

Each program runs as ``python -I program.py`` in a fresh temporary working directory, in its own
process group, with a wall-clock limit (the whole group is killed), a CPU-time limit and an
address-space limit (``RLIMIT_AS``), a minimal environment and no stdin. Outcome: ``passed``,
``failed`` (non-zero exit, e.g. a failed assert), ``timeout`` or ``memory``. This isolates crashes,
hangs and memory hogs; it is not a security boundary against hostile code (run untrusted models'
output in a container as well).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
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
    """MBPP: the generated code, the setup code, then the asserts of ``test_list``."""
    tests = "\n".join(problem.get("test_list", []))
    return f"{completion}\n\n{problem.get('test_setup_code', '')}\n{tests}\n"


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024) -> Result:
    """Execute ``source`` under the limits above and classify the outcome."""

    def limits():
        os.setsid()
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    with tempfile.TemporaryDirectory(prefix="minimoe-exec-") as work:
        program = Path(work) / "program.py"
        program.write_text(source)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-I", str(program)], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limits)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Result("timeout", f"killed after {timeout:g} s")
        err = err.decode(errors="replace")
        if proc.returncode == 0:
            return Result("passed")
        if "MemoryError" in err or proc.returncode == -signal.SIGKILL:
            return Result("memory", err[-500:])
        if proc.returncode == -signal.SIGXCPU:
            return Result("timeout", "CPU time limit")
        return Result("failed", err[-500:])
