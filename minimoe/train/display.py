"""What a person watching a run sees of its steps: on a terminal a progress bar (refreshed every ``--log-every``
steps, default 1); into a log file or a pipe (a cluster's job log) no bar frames, but a plain line every
``--log-every`` steps (default 10) and at the last step. Only the process that writes the run shows anything;
the lines of events and messages go above the bar through ``tqdm.write`` (the trainer's ``_say``)."""

from __future__ import annotations

import sys


class StepDisplay:
    """The bar or the plain lines of one training session, from step ``start`` to ``steps``."""

    def __init__(self, policy: str, start: int, steps: int, log_every: int, shown: bool):
        from tqdm.auto import tqdm

        terminal = sys.stderr.isatty()
        self.steps, self.every = steps, log_every or (1 if terminal else 10)
        self.lines = shown and not terminal
        self.bar = tqdm(total=steps, initial=start, dynamic_ncols=True, desc=policy, disable=not (shown and terminal))

    def step(self, record: dict, last: bool) -> None:
        """After optimizer step ``record["step"]`` (``last``: the last of this session)."""
        self.bar.update(1)
        step = record["step"]
        if step % self.every == 0 or (self.lines and last):
            if self.lines:
                print(f"step {step}/{self.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                      f"{record['tokens_per_s']:,.0f} tokens/s  trainable {record['trainable']:,}", flush=True)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", trainable=f"{record['trainable']:,}")

    def close(self) -> None:
        self.bar.close()
