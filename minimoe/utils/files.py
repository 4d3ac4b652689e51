"""Atomic directory writes: build into a hidden temporary sibling, then rename into place.

A reader never sees a half-written directory under the final name: a crash leaves at most a
``.NAME.tmp-*`` directory next to it, and a write that fails (a full disk, a file-size limit) removes its
temporary directory and leaves the previous copy as it was. An existing destination is replaced only when asked.

``write_failure`` finds the operating system's reason in what each writer raises (Python's ``OSError``,
safetensors' ``SafetensorError``, torch's ``RuntimeError``), for a command to say ``cannot write PATH: reason``;
``save_torch`` writes ``torch.save`` files so that a failed write raises the ``OSError`` itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path


class DestinationExists(FileExistsError):
    """The destination exists and overwriting was not requested."""


class Unwritable(OSError):
    """A destination that cannot be written (read-only, a full disk, a file where a directory should be);
    its message is one line naming the path, for a command to print as is."""


def check_writable(directory: str | os.PathLike) -> Path:
    """Check that files can be created in ``directory``: create it (and missing parents), create and remove a
    probe file in it, then remove the directories it created (the writer makes them again when it writes,
    and a run that fails before then leaves nothing behind). Writers call this before any expensive work, so
    an unwritable destination costs nothing; raises :class:`Unwritable` naming the directory (or the parent
    that could not be created)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise Unwritable(f"cannot write to {directory}: it is not a directory")
    created = [p for p in (directory, *directory.parents) if not p.exists()]  # deepest first
    try:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unwritable(f"cannot create {e.filename or directory}: {e.strerror or e}") from None
        try:
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise Unwritable(f"cannot write to {directory}: {e.strerror or e}") from None
    finally:
        for p in created:
            try:
                p.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break  # something else is in it now
    return directory


def check_destination(dst: str | os.PathLike, overwrite: bool = False, flag: str = "overwrite=True") -> Path:
    """Refuse an existing ``dst`` unless ``overwrite``. Writers call this before any expensive work (loading
    a model, building tensors, pretraining), so a refusal costs nothing; ``atomic_dir`` checks again."""
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise DestinationExists(f"{dst} already exists; pass {flag} to replace it (nothing was written)")
    return dst


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False, flag: str = "overwrite=True"):
    """``with atomic_dir(dst) as tmp:`` write into ``tmp``; on success it becomes ``dst``."""
    dst = check_destination(dst, overwrite, flag)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        mode = 0o666 & ~_umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                # safetensors writes 0600 files: give them the permissions any other file would get
                os.chmod(f, mode | (f.stat().st_mode & 0o111))
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = previous_copy(dst)
    if dst.exists():
        if old.exists():
            shutil.rmtree(old)  # stale: dst is the current copy
        dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        if old.exists() and not dst.exists():
            old.rename(dst)  # put the previous copy back: never lose both
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(dst.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small file through a temporary sibling and a rename: readers see the old or the new text."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _KeepsWriteError:
    """A binary file for ``torch.save`` that remembers the ``OSError`` of a failed ``write``: torch's writer
    swallows it and then fails on its own (``[enforce fail at inline_container.cc] . unexpected pos N vs M``)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):  # flush, seek, tell: the file's own
        return getattr(self.f, name)


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, written through a Python file so that a full disk or a file-size limit raises
    the ``OSError`` that says so. Given a path, torch writes the file itself and reports any failed write as
    ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 948160 vs 948080``: no path, no
    reason. (The file is the same apart from the archive's top folder name, which ``torch.load`` ignores.)"""
    import torch

    with open(path, "wb") as f:  # buffered: torch's writer assumes every write is whole
        sink = _KeepsWriteError(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None


# how a writer's message carries the OS error number: Rust's io::Error (safetensors) "... (os error 28)", or
# its debug form "IoError(Os { code: 28, kind: StorageFull, message: ... })"
_OS_ERROR = re.compile(r"\bos error (\d+)|\bOs \{ code: (\d+)")
# torch's messages when its own file writer fails (a path given to torch.save; the legacy format's "write(): fd")
_TORCH_WRITER = ("PytorchStreamWriter", "inline_container.cc", "file write failed", "basic_ios", "write(): fd")


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, in the operating system's words (``No space left on device``, ``File too large``,
    ``Permission denied``), from the exception a writer raised; None when ``error`` is not a failed write (a
    bug: let it through). safetensors carries the OS error's number in its message; torch's own writer often
    carries none, and then its message is the reason given (nothing is guessed)."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error).strip()
    if type(error).__name__ == "SafetensorError":
        found = _OS_ERROR.search(text)
        if found:
            return os.strerror(int(found[1] or found[2]))
        return text.split("I/O error:", 1)[1].strip()[:200] if "I/O error:" in text else None
    if isinstance(error, RuntimeError) and any(s in text for s in _TORCH_WRITER):
        seen, cause = set(), error.__cause__ or error.__context__
        while cause is not None and id(cause) not in seen:  # the OSError torch's writer was handling, if any
            if isinstance(cause, OSError):
                return write_failure(cause)
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        return f"torch's writer failed ({text.splitlines()[-1][:200] if text else type(error).__name__})"
    return None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def previous_copy(dst: str | os.PathLike) -> Path:
    """Where ``atomic_dir`` keeps the replaced directory during the swap (``.NAME.old``). Only a crash
    between its two renames leaves it there without ``NAME``; readers may fall back to it."""
    dst = Path(dst)
    return dst.parent / f".{dst.name}.old"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
