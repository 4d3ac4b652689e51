"""Atomic directory writes: build into a hidden temporary sibling, then rename into place.

A reader never sees a half-written directory under the final name: a crash leaves at most a
``.NAME.tmp-*`` directory next to it. An existing destination is replaced only when asked.
"""

from __future__ import annotations

import contextlib
import os
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
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
    try:
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
