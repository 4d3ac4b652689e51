"""An evaluation's progress on disk, so that a killed evaluation resumes where it stopped.

``minimoe eval`` keeps ``OUT.partial/`` next to its output directory while it runs:

    run.json          what is evaluated (`minimoe eval`'s arguments, the data files' digests): only the same
                      evaluation resumes from this directory
    completions.json  the generated completions (model runs), written once generation is over
    first-turns.json  replies the prompts are built on (PrefEval: the reply to the stated preference)
    rank-R.jsonl      one line per graded problem, ``{"index": i, "records": [...]}``, appended and flushed
                      by process R as soon as the problem is graded

Rerunning the same command reads them back: generation is skipped when the completions are there, graded
problems are not run again, and the files written at the end are those of an uninterrupted run (records
go through JSON either way). ``OUT.partial`` is removed once ``OUT`` is written. Each process appends to
its own file and reads every file, so a rerun with another number of processes resumes as well; a line
cut short by a kill is ignored (that problem is graded again).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..utils.files import Unwritable, write_text_atomic
from ..parallel.distributed import World


def partial_dir(out: str | os.PathLike) -> Path:
    """Where the progress of the evaluation writing ``out`` is kept: ``OUT.partial``."""
    out = Path(out)
    return out.parent / f"{out.name}.partial"


class Progress:
    """The ``OUT.partial`` directory of one evaluation, seen by one process (``world``)."""

    def __init__(self, path: Path, world: World = World()):
        self.path, self.world = Path(path), world
        self.file = self.path / f"rank-{world.rank}.jsonl"
        self._checked = False  # whether a line cut short at the end of our file was dropped

    @classmethod
    def open(cls, path: str | os.PathLike, run: dict, world: World = World(), restart: bool = False) -> Progress:
        """The progress directory for the evaluation described by ``run`` (JSON-serialisable), created if
        absent. One left by a different evaluation is a ValueError naming both, unless ``restart`` (then it
        is emptied). The first process decides; the others get its answer (no race on the directory)."""
        path, error = Path(path), None
        if world.main:
            try:
                error = cls._prepare(path, run, restart)
            except OSError as e:
                error = f"cannot write {e.filename or path}: {e.strerror or e}"
        error = world.gather(error)[0]
        if error:
            raise (Unwritable if error.startswith("cannot write") else ValueError)(error)
        return cls(path, world)

    @staticmethod
    def _prepare(path: Path, run: dict, restart: bool) -> str | None:
        described = path / "run.json"
        if described.is_file():
            try:
                before = json.loads(described.read_text())
            except ValueError:  # not written by this version: another evaluation as far as we know
                before = {}
            before = before if isinstance(before, dict) else {}
            if before == run:
                return None
            if not restart:
                changed = sorted(k for k in run.keys() | before.keys() if run.get(k) != before.get(k))
                return (f"{path} holds the progress of a different evaluation (it differs in: {', '.join(changed)}); "
                        "rerun that command to finish it, delete the directory, or pass --overwrite to start over")
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        write_text_atomic(described, json.dumps(run, indent=1))
        return None

    def graded(self) -> dict[int, list[dict]]:
        """The records of every problem graded so far, by problem index (all processes' files)."""
        done: dict[int, list[dict]] = {}
        for file in sorted(self.path.glob("rank-*.jsonl")):
            for line in file.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short
                done[entry["index"]] = entry["records"]
        return done

    def record(self, index: int, records: list[dict]) -> None:
        """Append problem ``index``'s records to this process's file, on disk before the next problem starts."""
        try:
            if not self._checked and self.file.is_file():  # after a kill mid-line: drop the cut line first
                data = self.file.read_bytes()
                if data and not data.endswith(b"\n"):
                    os.truncate(self.file, data.rfind(b"\n") + 1)
            self._checked = True
            with open(self.file, "ab") as f:
                f.write((json.dumps({"index": index, "records": records}) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise Unwritable(f"cannot write {self.file}: {e.strerror or e}") from None

    def completions(self) -> list[list[str]] | None:
        """The completions saved by an earlier run of this evaluation, or None."""
        return self.load("completions.json")

    def save_completions(self, completions: list[list[str]]) -> None:
        """Keep the generated completions (the first process writes them; every process holds them)."""
        self.save("completions.json", completions)

    def load(self, name: str):
        """The JSON value an earlier run of this evaluation saved as ``name``, or None."""
        saved = self.path / name
        return json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else None

    def save(self, name: str, value) -> None:
        """Keep a JSON value as ``name`` (written atomically by the first process; every process holds it)."""
        if self.world.main:
            try:
                write_text_atomic(self.path / name, json.dumps(value))
            except OSError as e:
                raise Unwritable(f"cannot write {self.path / name}: {e.strerror or e}") from None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
