"""The sandbox of generated programs against programs that try to beat the grader: killing the evaluator,
forging the pass verdict, outliving the evaluation, writing and connecting outside. What the kernel can
confine (Landlock) is measured, not assumed; ``confine=False`` runs show what holds without it."""

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from minimoe.eval import sandbox
from minimoe.eval.isolation import DONE, landlock_abi
from minimoe.eval.sandbox import SandboxUnavailable, check_sandbox, humaneval_program, run_program, sandbox_info

PROBLEM = {"task_id": "HumanEval/0", "entry_point": "add", "prompt": "def add(a, b):\n",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
WRONG = "    return 0\n"  # fails the tests: a program that passes with it has beaten the grader

# Each forges "my tests ran" and leaves before they do (placed before the tests, after a completion that
# fails them). The first is the attack that passed before: the done-marker's name and token were in the
# child's command line.
FORGERIES = {
    "marker from the command line": """
import os, re
for path in ('/proc/self/cmdline', '/proc/self/environ'):
    try:
        blob = open(path, 'rb').read()
    except OSError:
        continue
    names, tokens = re.findall(rb"done-[0-9a-f]{16}", blob), re.findall(rb"'([0-9a-f]{32})'", blob)
    for name in names:
        for token in tokens:
            open(name.decode(), 'w').write(token.decode())
os._exit(0)
""",
    "the done event raised by the program": f"""
import os, sys
try:
    sys.audit({DONE!r})
except RuntimeError:
    pass
os._exit(0)
""",
    "the bootstrap's own audit function, found through the frames": f"""
import os, sys
frame = sys._getframe()
while frame is not None:
    if 'audit' in frame.f_locals:
        try:
            frame.f_locals['audit']({DONE!r})
        except RuntimeError:
            pass
    frame = frame.f_back
os._exit(0)
""",
    "the bootstrap's globals rebound, then the event": f"""
import os, sys
frame = sys._getframe()
while frame is not None:
    for name, value in list(frame.f_globals.items()):
        if value == {DONE!r}:
            frame.f_globals[name] = "something else"
    frame = frame.f_back
try:
    sys.audit({DONE!r})
except RuntimeError:
    pass
os._exit(0)
""",
    "the verdict's writer looked up in the frames": """
import io, os, sys
frame = sys._getframe()
while frame is not None:
    for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
        if isinstance(value, io.BufferedWriter):
            value.flush()
    frame = frame.f_back
os._exit(0)
""",
    "a C-level callback raising the event": f"""
import functools, os, sys, weakref
class Thing:
    pass
thing = Thing()
ref = weakref.ref(thing, functools.partial(sys.audit, {DONE!r}))
try:
    del thing
except RuntimeError:
    pass
os._exit(0)
""",
    "random bytes to every descriptor": """
import os
for fd in range(3, 256):
    try:
        os.write(fd, os.urandom(32))
    except OSError:
        pass
os._exit(0)
""",
    "the verdict's writer looked up among all objects": """
import gc, io, os
for obj in gc.get_objects():
    if isinstance(obj, dict):
        for value in obj.values():
            if isinstance(value, io.BufferedWriter):
                value.flush()
os._exit(0)
""",
    "the interpreter's memory through ctypes": """
import os
try:
    import _ctypes, ctypes
    ctypes.string_at(id(os), 64)
except (ImportError, RuntimeError):
    pass
os._exit(0)
""",
    "the process's memory": """
import os
open('/proc/self/mem', 'rb')
os._exit(0)
""",
}


@pytest.mark.parametrize("confine", [True, False], ids=["landlock-if-any", "no-landlock"])
def test_a_forged_verdict_fails(confine):
    assert run_program(humaneval_program(PROBLEM, "    return a + b\n"), confine=confine).passed
    for name, forgery in FORGERIES.items():
        result = run_program(humaneval_program(PROBLEM, WRONG + forgery), confine=confine)  # before the tests
        assert result.status == "failed", (name, result)


@pytest.mark.parametrize("confine", [True, False], ids=["landlock-if-any", "no-landlock"])
def test_a_program_that_kills_its_parent_fails_and_the_evaluator_carries_on(confine):
    kill = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    result = run_program(humaneval_program(PROBLEM, "    return a + b\n" + kill), confine=confine)
    assert result.status == "failed"  # its parent is the supervisor: refused (Landlock) or killed, never us
    assert run_program(humaneval_program(PROBLEM, "    return a + b\n"), confine=confine).passed


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


# Leaves behind a process in a new session, exec'ed with an empty environment (no marker to find it by),
# whose parent has died, and tells its pid on stderr.
DETACH = """
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    pid = os.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)'], {})
    os.write(w, str(pid).encode())
    os._exit(0)
os.wait()
pid = os.read(r, 32).decode()
print('detached', pid, file=sys.stderr)
"""


@pytest.mark.slow
@pytest.mark.parametrize("confine", [True, False], ids=["landlock-if-any", "no-landlock"])
def test_a_detached_grandchild_does_not_outlive_the_program(tmp_path, confine):
    done = run_program(DETACH + "sys.exit(1)\n", confine=confine)  # fails, so its stderr is in the detail
    pid = int(next(line for line in done.detail.splitlines() if line.startswith("detached")).split()[1])
    assert not _alive(pid)
    hang = DETACH + f"open({str(tmp_path / 'pid')!r}, 'w').write(pid)\ntime.sleep(60)\n"
    assert run_program(hang, timeout=2, writable=[tmp_path], confine=confine).status == "timeout"
    assert not _alive(int((tmp_path / "pid").read_text()))


def _probe(outside: Path, port: int) -> str:
    """A program that tries to write outside its directory, connect to a TCP server, signal the evaluator
    and its own parent, and reports each outcome as JSON on stderr."""
    return f"""
import json, os, socket, sys
outcome = {{}}
def attempt(name, action):
    try:
        action()
        outcome[name] = "allowed"
    except OSError as e:
        outcome[name] = type(e).__name__
attempt("write", lambda: open({str(outside)!r}, "w").write("x"))
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", {port}), 2).close())
attempt("signal evaluator", lambda: os.kill({os.getpid()}, 0))
attempt("signal parent", lambda: os.kill(os.getppid(), 0))
print(json.dumps(outcome), file=sys.stderr)
sys.exit(1)
"""


@pytest.fixture
def tcp_server():
    """A loopback TCP server counting the connections it accepts."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()


def _measure(tmp_path, port, accepted, **kw) -> dict:
    outside = tmp_path / "outside.txt"
    outside.unlink(missing_ok=True)
    before = len(accepted)
    result = run_program(_probe(outside, port), **kw)
    outcome = json.loads(next(line for line in result.detail.splitlines() if line.startswith("{")))
    time.sleep(0.1)
    return {**outcome, "file written": outside.exists(), "server saw": len(accepted) - before}


def test_file_network_and_signal_confinement_follow_the_kernel(tmp_path, tcp_server):
    port, accepted = tcp_server
    abi = landlock_abi()
    assert sandbox_info("process") == {"sandbox": "process", "landlock_abi": abi}
    got = _measure(tmp_path, port, accepted)
    if abi >= 1:  # writes only in the program's own directory
        assert got["write"] == "PermissionError" and not got["file written"]
    else:
        assert got["write"] == "allowed" and got["file written"]
    if abi >= 4:  # no TCP
        assert got["tcp"] == "PermissionError" and got["server saw"] == 0
    else:
        assert got["tcp"] == "allowed" and got["server saw"] == 1
    if abi >= 6:  # no signal leaves the program's tree
        assert got["signal evaluator"] == got["signal parent"] == "PermissionError"
    else:
        assert got["signal evaluator"] == got["signal parent"] == "allowed"
    # without Landlock, the process sandbox confines none of these: the README says so
    bare = _measure(tmp_path, port, accepted, confine=False)
    assert bare["write"] == bare["tcp"] == bare["signal evaluator"] == "allowed"
    assert bare["file written"] and bare["server saw"] == 1


def test_bwrap_isolates_or_is_refused_with_a_clear_error(tmp_path, tcp_server, monkeypatch):
    port, accepted = tcp_server
    if shutil.which("bwrap") is None:
        with pytest.raises(SandboxUnavailable, match="needs bubblewrap"):
            check_sandbox("bwrap")
        with pytest.raises(SandboxUnavailable, match="needs bubblewrap"):
            run_program("pass\n", sandbox="bwrap")
        return
    check_sandbox("bwrap")  # installed and working here
    assert run_program(humaneval_program(PROBLEM, "    return a + b\n"), sandbox="bwrap").passed
    result = run_program(humaneval_program(PROBLEM, WRONG + FORGERIES["random bytes to every descriptor"]),
                         sandbox="bwrap")
    assert result.status == "failed"
    got = _measure(tmp_path, port, accepted, sandbox="bwrap", confine=False)  # bubblewrap alone, no Landlock
    assert got["write"] == "OSError" and not got["file written"]  # read-only root
    assert got["tcp"] != "allowed" and got["server saw"] == 0  # a network namespace of its own
    assert got["signal evaluator"] == "ProcessLookupError"  # a PID namespace: the evaluator is not there
    assert sandbox_info("bwrap")["sandbox"] == "bwrap"
    # and where bubblewrap is missing, asking for it is refused before anything runs
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox._bwrap_problem.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="needs bubblewrap"):
            check_sandbox("bwrap")
    finally:
        sandbox._bwrap_problem.cache_clear()


def test_the_supervisor_is_what_a_program_can_reach(tmp_path):
    """The program's parent is the supervisor, itself in a session of its own: not this process."""
    info = tmp_path / "info.json"
    program = (f"import json, os\njson.dump({{'ppid': os.getppid(), 'sid': os.getsid(0), 'pid': os.getpid()}}, "
               f"open({str(info)!r}, 'w'))\n")
    assert run_program(program, writable=[tmp_path]).passed
    got = json.loads(info.read_text())
    assert got["ppid"] != os.getpid() and got["sid"] == got["pid"] != os.getsid(0)
    assert not _alive(got["ppid"])  # the supervisor is gone with it
