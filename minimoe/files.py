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


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False, flag: str = "overwrite=True"):
    """``with atomic_dir(dst) as tmp:`` write into ``tmp``; on success it becomes ``dst``."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise DestinationExists(f"{dst} already exists; pass {flag} to replace it (nothing was written)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        old = dst.parent / f".{dst.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
