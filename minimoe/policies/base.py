"""What a training policy is: it chooses what trains, reads routing statistics, and resizes the model
at optimizer-step boundaries through the model's own methods (it never edits tensors itself)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..utils.options import option  # noqa: F401  (policies declare their options with it)
from .stats import RoutingStats


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class Context:
    """What a policy may need from the trainer at setup time."""

    dataset: object = None  # minimoe.data.dataset.Dataset (ESFT scores experts on a sample of it)
    batch_size: int = 8
    steps_per_epoch: int = 1
    total_steps: int = 0  # the run's steps (0: unknown)
    device: str = "cpu"
    seed: int = 0
    log: object = print  # one line for the user (the trainer's: above the progress bar, rank 0 only)
    stats: RoutingStats = field(default_factory=RoutingStats)  # the run's routing statistics (see policies/stats.py)
    part: tuple[int, int] = (0, 1)  # (rank, processes): this process's part of every global batch
    all_reduce: Callable = field(default=_same)  # sums a tensor over the processes, in place (one process: t)
    stats_tokens: str = "all"  # tokens a measurement counts: all real ones, or the response's (--stats-tokens)

    def next_batch(self):
        """This process's part of the next global batch of training data, on the device."""
        return self.dataset.next_batch(self.batch_size, self.part).to(self.device)

    @torch.no_grad()
    def measure_routing(self, model: nn.Module, batches: int, data_state: dict | None = None) -> RoutingStats:
        """Routing statistics of ``batches`` training batches (from data position ``data_state``, default the
        current one) in eval mode, over the tokens ``stats_tokens`` names (as training counts them), summed
        over the processes. The training data
        order is left where it was: a measurement is not training."""
        data = self.dataset
        saved = data.state_dict()
        was_training = model.training
        model.eval()
        stats = RoutingStats(self.all_reduce if self.part[1] > 1 else None)
        try:
            if data_state is not None:
                data.load_state_dict(data_state)
            for _ in range(batches):
                batch = self.next_batch()  # several processes: each measures its part of the global batch
                mask = batch.loss_mask if self.stats_tokens == "response" else batch.attention_mask
                out = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                            output_router=True)
                stats.observe(out, mask)
            stats.sync()
        finally:
            data.load_state_dict(saved)
            model.train(was_training)
        return stats


class Policy:
    """Base policy. Subclasses set ``name``, a ``Config`` dataclass whose defaults are the paper's,
    and override the hooks they need."""

    name = "base"

    @dataclass
    class Config:
        pass

    needs_router = False  # whether training forwards return their routing, for the routing statistics
    setup_runs_model = False  # whether setup runs forwards on the whole model (ESFT scores the experts there)
    trains_base_weights = False  # whether the base's own weights train (they need fp32: --dtype bfloat16 is refused)
    schedule = ("linear", 0.0)  # (lr schedule, warm-up ratio) of the paper: EPnG App. A.3, the Trainer defaults

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()
        self.generator = torch.Generator().manual_seed(0)  # growth init; saved with the run

    def setup(self, model: nn.Module, ctx: Context) -> None:
        """Attach adapters / choose what trains. On resume it runs after ``load_state_dict``."""

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def extra_loss(self, out, mask) -> torch.Tensor | None:
        """A loss added to the cross-entropy for this micro-batch (e.g. DMEP's LB loss); ``mask (B, T)`` the
        tokens that count. With several processes, return this process's share: the shares are summed
        (their gradients are), so normalise by global counts (``Context.all_reduce``)."""
        return None

    def observe(self, out, mask) -> None:
        """Called after every training forward (micro-batch) with the model output and the ``(B, T)``
        mask of tokens that count for statistics (real, and by default response, tokens). The routing
        statistics are already fed by then (``ctx.stats``, when ``needs_router``): this hook is for
        anything else a policy wants to see."""

    def start_events(self, model: nn.Module) -> list[dict]:
        """Event records of a new run's start (after ``setup``), e.g. ESFT's expert selection."""
        return []

    def end_events(self, model: nn.Module, step: int) -> list[dict]:
        """Event records of the end of training (every process calls it, before the last checkpoint), e.g.
        EPnG's importance of the fine-tuned model."""
        return []

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
        """Called after optimizer step ``step`` (1-based, grads zeroed). Returns event records."""
        return []

    def event_line(self, event: dict) -> str | None:
        """One human-readable line for an event record (printed during training), or None."""
        return None

    def metrics(self) -> dict:
        """Extra values for this step's metrics line."""
        return {}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def describe(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"policy {self.name}: {opts}"
