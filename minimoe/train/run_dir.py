"""``RunDir``: every file of a training run, written in one place.

    RUN/args.json         the resolved arguments (TrainConfig, every policy option), processes, global batch
    RUN/config.toml       the same as a TOML file: ``minimoe train --config RUN/config.toml`` repeats the run
    RUN/metrics.jsonl     one line per optimizer step
    RUN/events.jsonl      one line per prune / grow / slice / selection / routing measurement
    RUN/checkpoint/       everything needed to continue bit for bit (``checkpoint.py``)
    RUN/summary.json      written when the run ends
    RUN/adapter/          the fine-tune (``minimoe.save_adapter``), or RUN/model/ (full fine-tuning, Hub layout)
    RUN/base/             the base model, when it was built on the fly from a tiny preset

Small files are replaced atomically (temporary file, rename); directories are built aside and renamed
(``files.atomic_dir``); logs are appended a line at a time and cut back to the checkpoint's step on
resume. A ``RunDir`` made with ``writer=False`` writes nothing: with several processes only rank 0 holds
the writer, and every other rank runs the same code against a silent one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from . import checkpoint as ckpt
from ..utils.files import atomic_dir, write_failure, write_text_atomic

ARGS, METRICS, EVENTS, SUMMARY = "args.json", "metrics.jsonl", "events.jsonl", "summary.json"
LOGS = (METRICS, EVENTS)


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (it exists, or holds no run)."""


@contextlib.contextmanager
def writing(path: Path):
    """Turn a failed write under ``path`` into one ``RunDirError``, ``cannot write PATH: reason``, the reason in
    the operating system's words (``files.write_failure``: a read-only or missing directory, a full disk, a
    file-size limit, whichever writer met it: Python, safetensors or torch). What was saved before stays: files
    and directories are replaced atomically. Anything else (a bug) passes through as it is."""
    try:
        yield
    except RunDirError:
        raise
    except Exception as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise RunDirError(f"cannot write {path}: {reason}") from None


class RunDir:
    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # --- starting -----------------------------------------------------------------------------------
    def occupied(self) -> bool:
        """Whether something is there to be written over: a directory that holds anything, or a file."""
        return self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir()))

    def check_new(self, overwrite: bool) -> None:
        """Refuse an occupied directory unless ``overwrite`` (nothing is removed yet: see ``clear``)."""
        if self.occupied() and not overwrite:
            raise RunDirError(f"run directory {self.path} exists and is not empty; pass --overwrite to "
                              f"replace it or --resume {self.path} to continue it")

    def check_writable(self) -> None:
        """Refuse, before anything is loaded, a run directory that cannot be written (a probe file)."""
        if not self.writer:
            return
        with writing(self.path):
            existed = self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".minimoe-write-probe"
            probe.write_text("")
            probe.unlink()
            if not existed:
                self.path.rmdir()

    def clear(self) -> None:
        """Start empty: called once the run is known to be able to start (a bad flag, file or target found
        earlier never costs an existing run)."""
        if not self.writer:
            return
        with writing(self.path):
            if self.occupied():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)

    def write_preset_base(self, model, state: dict, tok) -> None:
        """The on-the-fly preset base (``state``: its weights before any adapter) in Hub layout, atomically:
        a crash never leaves a ``base/`` that looks complete."""
        if not self.writer:
            return
        from ..model.hf import write_hub_checkpoint

        with writing(self.base_dir), atomic_dir(self.base_dir) as tmp:
            write_hub_checkpoint(model, state, tmp, source=None)
            tok.save(tmp)

    @property
    def base_dir(self) -> Path:
        return self.path / "base"

    # --- logs ---------------------------------------------------------------------------------------
    def append(self, name: str, record: dict) -> None:
        """One JSON line at the end of a log (``METRICS`` or ``EVENTS``)."""
        if self.writer:
            with writing(self.path / name), (self.path / name).open("a") as f:
                f.write(json.dumps(record) + "\n")

    def read_log(self, name: str) -> list[dict]:
        f = self.path / name
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []

    # --- reading a run (the tools read runs through these: plots, check, reproduce, scaling) ------------
    def is_run(self) -> bool:
        """Whether a training run wrote here (its arguments or its step log)."""
        return (self.path / ARGS).is_file() or (self.path / METRICS).is_file()

    def args(self) -> dict:
        """The run's resolved arguments (``args.json``); raises if there are none."""
        return self.read_json(ARGS)

    def metrics(self) -> list[dict]:
        """One record per optimizer step (``metrics.jsonl``; none yet: empty)."""
        return self.read_log(METRICS)

    def events(self) -> list[dict]:
        """One record per prune / grow / slice / selection / measurement (``events.jsonl``)."""
        return self.read_log(EVENTS)

    def summary(self) -> dict:
        """``summary.json`` of a run that ended; empty for one that has not."""
        return self.read_json(SUMMARY) if (self.path / SUMMARY).is_file() else {}

    def count(self, name: str) -> int:
        f = self.path / name
        return sum(1 for line in f.open() if line.strip()) if f.is_file() else 0

    def truncate_logs(self, step: int) -> list[str]:
        """On resume, drop the log lines written after the checkpoint's step. An incomplete last line (a
        crash or a full disk during the append) is dropped too, and said so (the returned messages); any
        other line that is not a JSON record is an error naming the file and line."""
        notes = []
        for name in LOGS:
            f = self.path / name
            if not f.is_file():
                continue
            text = f.read_text(encoding="utf-8", errors="replace")
            lines = text.split("\n")
            keep = []
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    record_step = record["step"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    if n == len(lines) and not text.endswith("\n"):  # the last append did not finish
                        notes.append(f"{f}: dropped an incomplete last line ({len(line)} characters)")
                        break
                    raise RunDirError(f"{f}:{n}: not a log record ({type(e).__name__}: {e}); the run's logs "
                                      "are damaged; move the line away to resume") from None
                if record_step <= step:
                    keep.append(line)
            if self.writer:
                write_text_atomic(f, "".join(line + "\n" for line in keep))
        return notes

    def remove_temporaries(self) -> list[Path]:
        """Remove what an interrupted atomic write left behind (``.NAME.tmp-*``: never read, never complete)."""
        stale = sorted(self.path.glob(".*.tmp-*")) if self.writer and self.path.is_dir() else []
        for p in stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return stale

    # --- small files --------------------------------------------------------------------------------
    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=1))

    def write_text(self, name: str, text: str) -> None:
        if self.writer:
            with writing(self.path / name):
                write_text_atomic(self.path / name, text)

    def read_json(self, name: str) -> dict:
        return json.loads((self.path / name).read_text())

    def write_summary(self, summary: dict) -> None:
        self.write_json(SUMMARY, summary)

    def update_summary(self, **values) -> dict:
        """Add ``values`` to summary.json (written by the trainer when the run ended)."""
        summary = {**self.read_json(SUMMARY), **values} if (self.path / SUMMARY).is_file() else dict(values)
        self.write_summary(summary)
        return summary

    def finished(self, steps: int) -> str | None:
        """Why resuming this run for ``steps`` steps would do nothing (None if it would train or finish):
        it has a summary and its checkpoint is at ``steps`` or beyond. A run killed between its last
        checkpoint and its export has no summary: resuming it finishes the export."""
        try:
            step = ckpt.read_info(self.locate_checkpoint())["step"]
        except (FileNotFoundError, KeyError, ValueError):
            return None
        if step >= steps and (self.path / SUMMARY).is_file():
            return f"{self.path} finished at step {step}; to train longer pass --steps M with M > {step} " \
                   "(nothing was changed)"
        return None

    # --- checkpoints and the fine-tune --------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / ckpt.CHECKPOINT

    def locate_checkpoint(self) -> Path:
        """The checkpoint to resume from (the previous copy if a crash interrupted its replacement)."""
        return ckpt.locate(self.path)

    def save_checkpoint(self, model, optimizer, scheduler, info: dict, state: dict) -> Path:
        """Every process calls this (sharded weights are gathered by all); the writer writes."""
        weights = ckpt.trainable_state(model, keep=self.writer)
        optimizer_saved = ckpt.optimizer_state(model, optimizer, keep=self.writer)
        if self.writer:
            with writing(self.checkpoint_dir):
                ckpt.save_checkpoint(self.path, model, optimizer, scheduler, info, state, weights, optimizer_saved)
        return self.checkpoint_dir

    def export(self, model, base_fingerprint: str | None = None) -> Path:
        """The run's fine-tune in a loadable form: ``adapter/`` (adapters, ESFT experts) or ``model/``
        (full fine-tuning, Hub layout). ``base_fingerprint``: the base's, when it cannot be read now (sharded).
        Every process calls this (a sharded model is gathered by all); the writer writes."""
        from ..adapters.base import adapters_of
        from ..adapters.io import save_adapter
        from ..adapters.export import export_merged

        adapted = bool(adapters_of(model))
        path = self.path / ("adapter" if adapted else "model")
        state = None if adapted else ckpt.gathered(model.state_dict(), keep=self.writer)
        if self.writer:
            with writing(path):
                if adapted:
                    save_adapter(model, path, overwrite=True, base_fingerprint=base_fingerprint)
                else:
                    export_merged(model, path, overwrite=True, state=state)
        return path
