"""The two processes between the evaluator and a generated program's code: a supervisor, and the program's
own process with its bootstrap. Standard library only, because this file is never imported there: the
supervisor runs it as a script (``python -I isolation.py supervise CONFIG``) and the program's process
runs its text (``python -I -c TEXT program CONFIG``). :mod:`minimoe.eval.sandbox` starts the supervisor.

    evaluator ──one JSON line──> supervisor ──exit status, verdict pipe──> program process

Why a supervisor: the graded code's parent is the supervisor, not the evaluator, so ``os.kill(os.getppid(),
...)`` hits a process whose loss the evaluator notices and records as a failure. The supervisor is a child
subreaper (``PR_SET_CHILD_SUBREAPER``): every process the program starts and orphans, ``setsid`` or not, is
re-parented to it, and when the program ends (or times out) it SIGKILLs and reaps its children until none
is left. The supervisor and the program each run in their own session and process group.

Why the verdict cannot come from the program: the supervisor makes a random 32-byte token and hands it to
the program's process through a pipe that the bootstrap drains and closes before any program code exists.
The bootstrap writes the token into the *buffer* of a ``BufferedWriter`` on the verdict pipe (nothing is
written yet) and puts that writer as the only value of a dict whose bound ``pop`` becomes an audit hook: a C
function, held by nothing but the interpreter's hook list, which Python code cannot list or read. The token
is now in no argument, environment variable, file, open pipe or Python frame; only the hook event
``minimoe.sandbox.done`` pops the writer, whose deallocation flushes the token. A guard hook, added first (a
hook that raises stops the later ones), lets that event through only from the bootstrap's own frame at the
instruction that follows ``runpy.run_path`` returning normally, i.e. after the program's last line -- its
tests -- ran; its state is in its code's constants, which no frame of the program can rebind. It also
refuses what could read the buffer or the interpreter around it (``gc`` object walks, ``ctypes``,
subinterpreters, tracing, opening ``/proc/*/mem``) and ends the process before an interpreter shutdown would
free, and so flush, the writer. No frame of the bootstrap holds the writer once the program runs. The
program's process is not dumpable and, as root, loses CAP_SYS_PTRACE, so its children cannot read its memory
either. The supervisor passes a program only if it exited 0 and the verdict pipe holds exactly the token;
``sys.exit(0)``, ``os._exit(0)``, a forged event or bytes written to any descriptor all fail.

Where the kernel has Landlock (Linux 5.13+; detected at run time), the program's process tree may write
only in its temporary directory (and ``/dev/null``), may not read ``/proc``, may not bind or connect TCP
sockets (Landlock ABI 4, Linux 6.7+) and may not signal any process outside itself (ABI 6, Linux 6.12+):
not the supervisor, not the evaluator. Without it those are not confined. ``--sandbox bwrap`` runs the
program in bubblewrap besides: new user, PID, network, IPC and UTS namespaces, the root read-only, only
the temporary directory writable, and every process killed with the namespace.

What this does not stop: without Landlock's signal scope, a program can look up the evaluator's pid and
signal it, or kill its supervisor and leave a process in a new session with a cleared environment (the
evaluator then only kills the program's process group and what still carries its environment marker);
without Landlock, it can write anywhere its user may, use the network, and read its own memory through a
path the guard does not recognise (a symlink to ``/proc/self/mem``); Landlock leaves UDP and Unix sockets
open; a memory-safety bug in CPython defeats the guard; and the tests run in the completion's interpreter,
so a completion can still make them vacuous (an object equal to everything). A guard against accidents
and sloppy or overreaching code, not a container: run hostile code with ``--sandbox bwrap`` or in a VM.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

DONE = "minimoe.sandbox.done"  # the hook event that releases the verdict (see the module docstring)
TOKEN_BYTES = 32
PROGRAM = "program.py"  # in the temporary directory, which is the program's working directory
STDERR = ".stderr"  # the program's stderr, of which the evaluator reads the tail

# prctl(2) options and capabilities (linux/prctl.h, linux/capability.h)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 36, 38
CAP_SYS_PTRACE, CAP_SYS_RESOURCE = 19, 24
# Landlock (linux/landlock.h): system calls, file-system and network access rights, scopes
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_TCP = 3  # bind and connect
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1, 2


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where it fails or is not Linux."""
    try:
        return _libc().prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none, or not Linux)."""
    try:
        return max(0, _libc().syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1))  # LANDLOCK_CREATE_RULESET_VERSION
    except (OSError, AttributeError):
        return 0


def landlock(writable: list[str]) -> int:
    """Confine this process and its future children (see the module docstring): read and execute anything
    but ``/proc``, write only under ``writable`` and to ``/dev/null``, no TCP, no signals out. Returns the
    ABI used, 0 if Landlock is unavailable (then nothing is confined)."""
    import ctypes

    abi = landlock_abi()
    if abi < 1:
        return 0
    libc = _libc()
    fs = (1 << 13) - 1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    fs |= FS_IOCTL_DEV if abi >= 5 else 0
    attr = (ctypes.c_uint64 * 3)(fs, NET_TCP if abi >= 4 else 0, SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 * (1 if abi < 4 else 2 if abi < 6 else 3)
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return 0
    file_rights = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    rules = [(f"/{name}", read) for name in os.listdir("/") if name != "proc"]
    rules += [("/dev/null", FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV)]
    rules += [(path, fs) for path in writable]
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= file_rights
        beneath = (ctypes.c_uint8 * 12).from_buffer_copy(
            (rights & fs).to_bytes(8, sys.byteorder) + fd.to_bytes(4, sys.byteorder, signed=True))  # packed struct
        libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(beneath), 0)  # LANDLOCK_RULE_PATH_BENEATH
        os.close(fd)
    ok = prctl(PR_SET_NO_NEW_PRIVS, 1) and libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0
    os.close(ruleset)
    return abi if ok else 0


def drop_capabilities(caps=(CAP_SYS_PTRACE, CAP_SYS_RESOURCE)) -> None:
    """As root: give up ``caps`` now and in every program this process executes. Without CAP_SYS_PTRACE no
    process of the program's tree may read the memory of a non-dumpable one; without CAP_SYS_RESOURCE the
    resource limits bind root too."""
    import ctypes

    if os.geteuid() != 0:
        return
    libc = _libc()
    for cap in caps:
        prctl(PR_CAPBSET_DROP, cap)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # {effective, permitted, inheritable} x 2 words
    if libc.capget(header, data) == 0:
        for i in range(3):
            for cap in caps:
                data[i] &= ~(1 << cap)
        libc.capset(header, data)


# ----------------------------------------------------------------------------------------------------
# The program's process
# ----------------------------------------------------------------------------------------------------

# The guard hook. Its state (the bootstrap's frame, the DONE call's offsets, the functions it calls) goes
# into its code's constants in place of the "@..." placeholders: a program that reaches the guard's frame
# (a signal handler or a finaliser running inside it) can rebind a frame's globals and, since Python 3.13,
# its locals and cells, but not the constants of its code. Nothing here looks a name up.
_GUARD = """
def guard(event, args):
    if event == "minimoe.sandbox.done":
        if "@getframe"(1) is not "@runner" or "@getframe"(1).f_lasti not in "@done_at":
            raise "@RuntimeError"("sandbox: only the bootstrap reports that the tests ran")
    elif event == "cpython.PyInterpreterState_Clear" or event == "cpython._PySys_ClearAuditHooks":
        "@exit"(1)  # an interpreter shutdown would free the verdict's writer, and so flush it
    elif event in {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
                   "sys._settraceallthreads", "sys._setprofileallthreads", "sys.monitoring.register_callback",
                   "cpython.PyInterpreterState_New"} or event.startswith("ctypes."):
        raise "@RuntimeError"("sandbox: " + event + " is not allowed")
    elif event == "import" and "@startswith"(args[0], ("ctypes", "_ctypes", "_test", "_xxsubinterpreters",
                                                       "_xxinterp", "_interp", "interpreters")):
        raise "@ImportError"("sandbox: ctypes, CPython's test modules and subinterpreters are not allowed")
    elif event == "open" and "@type"(args[0]) is "@str" and args[0].rsplit("/", 1)[-1] == "mem":
        raise "@PermissionError"("sandbox: process memory is not readable")
    elif event == "open" and "@type"(args[0]) is "@bytes" and args[0].rsplit(b"/", 1)[-1] == b"mem":
        raise "@PermissionError"("sandbox: process memory is not readable")
"""


def _guard(runner, done_at: frozenset, exit_now):
    """The first audit hook (see the module docstring): DONE only from ``runner`` at ``done_at``; no ``gc``
    object walks, ``ctypes`` (whose ``Py_DECREF`` raises no event), tracing, C-API test modules or
    subinterpreters (they run without this interpreter's hooks), ``/proc/*/mem``; the process ends where an
    interpreter shutdown would begin."""
    import types
    import warnings

    values = {"@getframe": sys._getframe, "@runner": runner, "@done_at": done_at, "@exit": exit_now,
              "@RuntimeError": RuntimeError, "@ImportError": ImportError, "@PermissionError": PermissionError,
              "@startswith": str.startswith, "@type": type, "@str": str, "@bytes": bytes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # calling and comparing the placeholder strings
        module = compile(_GUARD, "<sandbox guard>", "exec")
    code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    code = code.replace(co_consts=tuple(values.get(c, c) if type(c) is str else c for c in code.co_consts))
    return types.FunctionType(code, {"__builtins__": {}})


def _report(exc: BaseException) -> None:
    """The traceback of the program's exception to stderr (the evaluator reads its tail)."""
    import traceback

    try:
        tb = exc.__traceback__  # from the program's first frame: the bootstrap's and runpy's say nothing
        while tb is not None and tb.tb_frame.f_code.co_filename != PROGRAM:
            tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))
    except BaseException:  # a MemoryError, or the program's own __str__ failing
        text = f"{type(exc).__name__}\n"
    try:
        os.write(2, text[-8000:].encode(errors="replace"))
    except BaseException:
        pass


def _verdict_writer(token_fd: int, verdict_fd: int):
    """A writer on the verdict pipe with the token in its buffer, not written yet; the token pipe is closed."""
    buf = bytearray(TOKEN_BYTES)
    got = 0
    while got < TOKEN_BYTES:
        n = os.readv(token_fd, [memoryview(buf)[got:]])
        if n == 0:
            os._exit(3)
        got += n
    os.close(token_fd)
    os.set_inheritable(verdict_fd, False)  # a program it executes does not get it; a fork does
    writer = open(verdict_fd, "wb", buffering=4096)  # noqa: SIM115 (freed, and so flushed, by the hook)
    writer.write(buf)
    buf[:] = bytes(TOKEN_BYTES)
    return writer


def _runner(token_fd, verdict_fd, run_path, audit, _exit, report):
    """Arm the hooks, then run the program as ``__main__``; the DONE event below is reached only if it
    returned normally. The verdict's writer is referenced nowhere else (no caller's frame holds it); every
    name used after the program started is a local bound before it did; the process always ends here."""
    frame = sys._getframe()
    writer = _verdict_writer(token_fd, verdict_fd)
    sys.addaudithook(_guard(frame, _done_offsets(frame.f_code), _exit))
    sys.addaudithook({DONE: writer}.pop)  # the only owner of the writer, and of the token in its buffer
    del writer, frame
    try:
        try:
            run_path(PROGRAM, run_name="__main__")
        except SystemExit as e:
            if e.code is None or e.code == 0:
                _exit(0)  # exit 0 without the token: "exited before its tests finished"
            report(e)
            _exit(1)
        except BaseException as e:
            report(e)
            _exit(1)
        else:
            audit("minimoe.sandbox.done")
            _exit(0)
    finally:
        _exit(1)


def _done_offsets(code) -> frozenset:
    """The instruction offsets of the DONE call in ``_runner``: from loading the event name to the call."""
    import dis

    offsets, seen = set(), False
    for ins in dis.get_instructions(code):
        seen = seen or (ins.opname == "LOAD_CONST" and ins.argval == DONE)
        if seen:
            offsets.add(ins.offset)
            if ins.opname.startswith("CALL"):
                break
    return frozenset(offsets)


def program_main(cfg: dict) -> None:
    """Bootstrap of the program's process: confine, limit, take the token, arm the hooks, run the program."""
    import gc
    import resource
    import runpy

    prctl(PR_SET_DUMPABLE, 0)
    drop_capabilities()
    if cfg["landlock"] and landlock_abi() and not landlock([os.getcwd(), *cfg["writable"]]):
        # never weaker than summary.json says (it records the kernel's ABI): fail every program, loudly
        os.write(2, b"sandbox: the kernel has Landlock, but confining the program failed\n")
        os._exit(4)
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # what the bootstrap used: the program imports it anew, which the guard refuses
    gc.collect()
    for name, value in cfg["limits"]:
        resource.setrlimit(getattr(resource, name), (value, value))
    _runner(cfg["token_fd"], cfg["verdict_fd"], runpy.run_path, sys.audit, os._exit, _report)


# ----------------------------------------------------------------------------------------------------
# The supervisor
# ----------------------------------------------------------------------------------------------------

def bwrap_argv(work: str, writable: list[str]) -> list[str]:
    """bubblewrap: new namespaces (user, PID, network, IPC, UTS), a new session, the root read-only with a
    fresh /dev and /proc, the temporary directory (and ``writable``) writable, killed with the supervisor."""
    binds = [arg for path in (work, *writable) for arg in ("--bind", path, path)]
    return ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--dev", "/dev",
            "--proc", "/proc", *binds, "--chdir", work, "--"]


def _children(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    line = f.read()
            except OSError:
                continue
            if int(line[line.rindex(b")") + 2:].split()[1]) == pid:  # the field after the state: ppid
                kids.append(int(name))
    return kids


def kill_descendants() -> None:
    """SIGKILL and reap this process's children until it has none. As a subreaper it inherits every orphan
    of its tree, so this reaches processes that left their session or whose parent died, at any depth."""
    if not os.path.isdir("/proc"):
        return
    while kids := _children(os.getpid()):
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in kids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _abandon(*_) -> None:
    """The evaluator is gone or gives up (SIGTERM): kill the program's whole tree, then leave."""
    kill_descendants()
    os._exit(1)


def supervise(cfg: dict) -> None:
    """Run the program (see the module docstring) and print two JSON lines: its pid, then its outcome."""
    parent = os.getppid()
    signal.signal(signal.SIGTERM, _abandon)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # a killed evaluator leaves no program running
    if os.getppid() != parent:
        _abandon()
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_DUMPABLE, 0)
    token = os.urandom(TOKEN_BYTES)
    token_r, token_w = os.pipe()
    os.write(token_w, token)
    os.close(token_w)
    verdict_r, verdict_w = os.pipe()
    program = {"token_fd": token_r, "verdict_fd": verdict_w, "limits": cfg["limits"], "landlock": cfg["landlock"],
               "writable": cfg["writable"]}
    with open(__file__, encoding="utf-8") as f:
        text = f.read()
    argv = [cfg["python"], "-I", "-c", text, "program", json.dumps(program)]
    bwrap = cfg["sandbox"] == "bwrap"
    if bwrap:
        argv = bwrap_argv(cfg["work"], cfg["writable"]) + argv
    with open(os.path.join(cfg["work"], STDERR), "wb") as err:
        proc = subprocess.Popen(argv, cwd=cfg["work"], env=cfg["env"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, pass_fds=(token_r, verdict_w),
                                start_new_session=True)
    os.close(token_r)
    os.close(verdict_w)
    print(json.dumps({"pid": proc.pid}), flush=True)
    timed_out = False
    try:
        code = proc.wait(cfg["timeout"])
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        code = proc.wait()
    kill_descendants()  # every writer of the verdict pipe is gone: reading it ends
    got = b""
    while len(got) <= 4 * TOKEN_BYTES and (chunk := os.read(verdict_r, 4096)):
        got += chunk
    if bwrap and code > 128:
        code = 128 - code  # bwrap exits 128 + N when its program died of signal N
    print(json.dumps({"returncode": code, "timed_out": timed_out, "verdict": got == token}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "supervise":
        supervise(json.loads(sys.argv[2]))
    elif sys.argv[1] == "program":
        program_main(json.loads(sys.argv[2]))
