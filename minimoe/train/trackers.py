"""``--report-to``: the run's metrics, events, configuration and summary, also sent to the experiment trackers
people watch runs in — TensorBoard, Weights & Biases, trackio — besides ``metrics.jsonl`` / ``events.jsonl``.

What each gets (the process that writes the run directory only, rank 0 under torchrun):

* every number of each ``metrics.jsonl`` line, at its step, under the same name (``loss``, ``lr``, ...);
* each event (prune/grow, slice, selection, schedule, compile, ...): its numbers as ``events/<event>/<key>`` at
  its step (e.g. ``events/prune_grow/params_after``) and, where the tracker shows text, the whole record;
* the resolved configuration as hyper-parameters, and the final summary.

A resumed run continues the same tracker run: TensorBoard writes into ``RUN/tensorboard`` again and drops what
was logged after the checkpoint (``purge_step``); W&B and trackio reopen the run whose id ``RUN/trackers.json``
recorded. ``WANDB_MODE=offline`` (clusters without network) is W&B's own setting and is honoured; the run's
files go under ``RUN/wandb``. trackio stores locally (``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``).
Each tracker is an optional extra (``pip install 'minimoe[tensorboard]'``, ``[wandb]``, ``[trackio]``); a tracker
that is not installed or cannot start is an error at the start of the run, before the first step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

TRACKERS = ("none", "tensorboard", "wandb", "trackio")
PROJECT = "minimoe"  # the W&B / trackio project unless WANDB_PROJECT / TRACKIO_PROJECT says otherwise
IDS = "trackers.json"  # RUN/trackers.json: the tracker runs this run writes to (resume continues them)


class TrackerError(RuntimeError):
    """A tracker that is not installed or could not start."""


def missing(names: tuple[str, ...]) -> str | None:
    """Why ``--report-to names`` cannot run here (a package not installed), or None."""
    for name in names:
        if name != "none" and importlib.util.find_spec(name) is None:
            return f"--report-to {name} needs the {name} package: pip install 'minimoe[{name}]'"
    return None


def _numbers(record: dict) -> dict[str, float]:
    """The top-level numbers of a record (bools and containers left out)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict, step: int, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        # resuming at step s: anything logged after s (a run killed after its checkpoint) is dropped
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)
        if not step:
            self.writer.add_text("config", f"```\n{json.dumps(config, indent=2, default=str)}\n```", 0)

    def log(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def text(self, tag: str, step: int, record: dict) -> None:
        self.writer.add_text(tag, f"```\n{json.dumps(record, default=str)}\n```", step)

    def summary(self, summary: dict) -> None:
        self.text("summary", summary.get("steps", 0), summary)

    def finish(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict, step: int, ids: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name,
                              id=ids.get("wandb"), resume="allow", dir=str(run_dir), config=config)
        ids["wandb"] = self.run.id

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def text(self, tag: str, step: int, record: dict) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{json.dumps(record, default=str)}</pre>")}, step=step)

    def summary(self, summary: dict) -> None:
        self.run.summary.update({f"summary/{k}": v for k, v in _numbers(summary).items()})

    def finish(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, run_dir: Path, config: dict, step: int, ids: dict):
        import trackio

        self.trackio = trackio
        name = ids.get("trackio") or f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=name, config=config,
                     resume="allow" if "trackio" in ids else "never", embed=False)
        ids["trackio"] = name

    def log(self, step: int, values: dict) -> None:
        self.trackio.log(values, step=step)

    def text(self, tag: str, step: int, record: dict) -> None:
        pass  # trackio shows numbers; the event's numbers were logged

    def summary(self, summary: dict) -> None:
        self.trackio.log({f"summary/{k}": v for k, v in _numbers(summary).items()}, step=summary.get("steps", 0))

    def finish(self) -> None:
        self.trackio.finish()


_CLASSES = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}


class Trackers:
    """The trackers of one run (none: every call does nothing)."""

    def __init__(self, names: tuple[str, ...], run, config: dict, step: int = 0):
        """Start each tracker for the run directory ``run`` (a ``RunDir``; ``step``: the step a resumed run
        continues from, 0 for a new run). A tracker that fails to start stops the ones already started and
        raises TrackerError naming it."""
        self.trackers = []
        names = tuple(n for n in names if n != "none")
        ids = run.read_json(IDS) if step and (run.path / IDS).exists() else {}
        for name in names:
            try:
                self.trackers.append(_CLASSES[name](run.path, config, step, ids))
            except Exception as e:  # noqa: BLE001 - any failure of a tracker's start is reported as such
                self.finish()
                raise TrackerError(f"--report-to {name}: the tracker could not start: {type(e).__name__}: {e}") from e
        if names:
            run.write_json(IDS, ids)

    def log(self, record: dict) -> None:
        """One ``metrics.jsonl`` line."""
        values = {k: v for k, v in _numbers(record).items() if k != "step"}
        for t in self.trackers:
            t.log(record["step"], values)

    def event(self, record: dict) -> None:
        """One ``events.jsonl`` record."""
        name, step = record["event"], record.get("step", 0)
        counts = {f"events/{name}/{k}": v for k, v in _numbers(record).items() if k != "step"}
        for t in self.trackers:
            if counts:
                t.log(step, counts)
            t.text(f"events/{name}", step, record)

    def summary(self, summary: dict) -> None:
        for t in self.trackers:
            t.summary(summary)

    def finish(self) -> None:
        while self.trackers:
            self.trackers.pop().finish()
