"""The training loop behind ``minimoe train``: written out, one optimizer step at a time.

    for step in 1..steps:
        for each micro-batch: forward (routing info if the policy reads it), loss = CE + policy loss,
                              backward, routing statistics += the forward's routes, policy.observe(...)
        clip, optimizer.step, scheduler.step, zero_grad
        statistics.sync()          ← the one cross-process reduction of routing statistics
        policy.after_step(step)    ← the only place the model may change shape
        metrics line; checkpoint every save_every steps

Every file goes through the run directory (``run_dir.RunDir``): what it is asked for (TrainConfig) is in
``config.py``; the routing statistics every policy decides from are one ``policies.stats.RoutingStats``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from . import agreement, checkpoint as ckpt
from ..parallel import strategy
from ..adapters.adamw import AdamW
from ..data.dataset import Dataset, answer_only, load_pairs
from ..model.compiling import compile_layers, compile_line
from ..model.hf import resolve
from ..utils.options import check_choices, to_toml
from ..policies import POLICIES, Context, Policy, make_policy
from .base_model import load_model_and_tokenizer
from .lock import RunLock, RunLockError
from .schedule import lr_schedule, rebase
from .trackers import TrackerError, Trackers, missing
from .display import StepDisplay
from .stopping import INTERRUPTED, PREEMPTED, DivergenceWatch, StopRequests
from .run_dir import EVENTS, METRICS, RunDir, RunDirError
from ..policies.stats import RoutingStats
from ..utils.memory import peak_memory_mb
from .config import DTYPES, LEGACY_ARGS, TrainConfig, TrainingError, check_device, default_model, is_preset
from ..parallel.distributed import World

__all__ = ["TrainConfig", "Trainer", "TrainingError", "lr_schedule", "load_model_and_tokenizer"]


def _finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` (this process's shards) is finite: one reduction, one sync."""
    local = [t.detach().to_local() if hasattr(t, "to_local") else t.detach() for t in tensors]  # a shard: its part
    local = [t for t in local if t.numel()]
    return not local or bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(local)])).all())


class Trainer:
    """One run, read top to bottom: ``Trainer(config)`` only keeps its own copy of the config (no I/O);
    ``setup()`` makes everything the run needs, in an order that matters, one method per stage; ``train()``
    runs the steps (setting up first if that was not done); ``save()`` checkpoints.

    ``setup()``:

    1. ``_check`` — flags that cannot work are refused before anything is loaded;
    2. ``_load`` — data, model, tokenizer and the policy object (and, resuming, the checkpoint's info and
       state, read once): bad input fails here, before anything on disk changes;
    3. ``_setup`` — the policy attaches its adapters / chooses what trains; a resumed run rebuilds the saved
       adapter layout on top; the model is spread over the processes; the optimizer and schedule are built;
    4. ``resume`` (from the state read in 2) or ``_start`` (a new run: only now is the run directory cleared
       and written).
    """

    def __init__(self, config: TrainConfig, show_progress: bool = True):
        self.config = dataclasses.replace(config)  # its own copy: the caller's TrainConfig is never changed
        self.show_progress = show_progress
        self.step = 0
        self.ready = False
        self._trainable: int | None = None  # trainable parameters, recounted after each event
        self._saved_step: int | None = None  # the step of the last checkpoint this session wrote
        self.trackers = Trackers((), None, {})  # --report-to: started with the run (_start, resume)
        # Ctrl-C, SIGTERM, SIGUSR1 while train() runs: finish the step, checkpoint, stop (stopping.py)
        self.stops = StopRequests(lambda line: self.world.print(line, flush=True))

    def setup(self) -> Trainer:
        """Everything the run needs (see the class docstring); returns the trainer. The run directory's lock is
        taken here and held until ``train()`` ends (given back at once if setup fails)."""
        self.lock, started = None, time.perf_counter()
        try:
            self._check()
            saved = self._load()
            self._setup(saved)
            if saved is not None:
                self.resume(saved)
            else:
                self._start()
        except BaseException:
            self.release()
            raise
        self.ready, self.startup_s = True, time.perf_counter() - started  # loading, tokenising, the policy's setup
        return self

    def release(self) -> None:
        """Give up the run directory's lock (the end of ``train()`` does)."""
        self.trackers.finish()
        if getattr(self, "lock", None) is not None:
            self.lock.release()

    @property
    def run_dir(self) -> Path:
        """The run directory's path (``self.run`` is the object that writes it)."""
        return self.run.path

    # --- construction ------------------------------------------------------------------------------
    def _check(self) -> None:
        c = self.config
        self.world = World.from_env(c.device, c.dist_timeout)  # torchrun: this process's rank; else rank 0 of 1
        self.device = check_device(self.world.device(c.resolved_device()))
        try:
            check_choices(c)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if problem := strategy.problem(c, POLICIES[c.policy], self.world, self.device) or missing(c.report_to):
            raise TrainingError(problem)
        if c.dtype != "float32" and POLICIES[c.policy].trains_base_weights:
            # AdamW updates of bf16 weights round most small steps away; these policies train base weights
            raise TrainingError(f"--dtype {c.dtype} with --policy {c.policy}: the trained weights would be "
                                "bf16 without fp32 master copies; use --dtype float32 (bf16 autocast runs on CUDA)")
        self.run = RunDir(c.resume or c.out or f"runs/{c.policy}", writer=self.world.main)
        # the writer looks (before it writes anything) and tells the others: a process that looked later
        # might find the files the writer has started to write
        self.lock = RunLock(self.run.path) if self.run.writer else None
        problem = None
        if self.run.writer:
            try:
                self.lock.check()  # another live run holds it: refused, naming it (--overwrite included)
                if not c.resume:
                    self.run.check_new(c.overwrite)
            except (RunLockError, RunDirError) as e:
                problem = str(e)
        if self.world.any(problem is not None, self.device):
            raise TrainingError(problem or f"run directory {self.run} cannot be used (see rank 0)")
        try:
            self.run.check_writable()  # before the model is loaded: a read-only or impossible path costs nothing
        except RunDirError as e:
            raise TrainingError(str(e)) from None
        note = None
        if self.lock is not None:  # held from here to the end of train() (released if setup fails)
            try:
                note = self.lock.acquire()
            except (RunLockError, OSError) as e:
                problem = str(e) if isinstance(e, RunLockError) else f"cannot write {self.lock.path}: {e.strerror}"
        if self.world.any(problem is not None, self.device):
            raise TrainingError(problem or f"run directory {self.run} cannot be locked (see rank 0)")
        if note:
            self._say(note)

    def _load(self) -> dict | None:
        """Data, model, tokenizer, policy (and, resuming, the saved checkpoint's info and state)."""
        c = self.config
        c.model = c.model or default_model(c.policy)
        self.preset = is_preset(c.model)  # a tiny preset: random weights, written to RUN/base/
        if not self.preset:
            resolve(c.model)
        pairs = load_pairs(c.data, c.seed, c.data_filter)
        if c.answer_only:
            pairs = answer_only(pairs, c.data)
        self.policy: Policy = make_policy(c.policy, c.policy_options)
        torch.manual_seed(c.seed)
        self.model, self.tok = load_model_and_tokenizer(c.model, strategy.load_device(c, self.device), c.seed,
                                                        self.run.base_dir, DTYPES[c.dtype])
        # a preset's random base, kept (tiny) until the run directory may be written
        self._preset_base = ({k: v.detach().clone() for k, v in self.model.state_dict().items()}
                             if self.preset and not c.resume else None)
        self.model.gradient_checkpointing = c.gradient_checkpointing
        limit = self.model.config.max_position_embeddings
        if c.max_len > limit:  # positions the model never saw: refused rather than trained on silently
            raise TrainingError(f"--max-len {c.max_len} is above the model's max_position_embeddings ({limit}); "
                                f"pass --max-len {limit} or less")
        empty = sum(1 for _, response in pairs if not response.strip())
        if empty:
            self._say(f"{c.data}: {empty} of {len(pairs)} examples have an empty response (only the "
                      "end-of-sequence token is trained on them)")
        self.data = Dataset.build(pairs, self.tok, c.max_len, c.packing, c.seed,
                                  group=c.batch_size * self.world.size if c.group_by_length else 0)
        if self.data.truncated:
            self._say(f"{c.data}: {self.data.truncated} of {len(pairs)} examples are longer than --max-len "
                      f"{c.max_len} and were cut to it")
        # several processes: the same data, base and configuration on each (the base's fingerprint, FSDP reuses)
        self._base_fingerprint, problems = agreement.check(self.world, self.data, self.model, c)
        if problems:
            raise TrainingError("; ".join(problems) if self.world.main else "the processes disagree (see rank 0)")
        self.part = (self.world.rank, self.world.size)  # this process's part of every global batch
        self.global_batch = c.batch_size * c.grad_accum * self.world.size
        self.steps_per_epoch = max(1, math.ceil(len(self.data) / self.global_batch))
        if c.epochs and not c.resume:  # (resuming, the saved --steps stand; --steps M stretches them)
            c.steps = max(1, math.ceil(c.epochs * len(self.data) / self.global_batch))
            self._say(f"--epochs {c.epochs:g}: {c.steps} steps ({len(self.data)} examples, global batch "
                      f"{self.global_batch})")
        self.policy.generator.manual_seed(c.seed)
        if not c.resume:
            return None
        found = self.run.locate_checkpoint()
        info = ckpt.read_info(found)
        if info["policy"] != c.policy:
            raise TrainingError(f"--resume {self.run}: the run used policy {info['policy']}, not {c.policy}")
        state = ckpt.load_pickle(found / "state.pt")
        self.policy.load_state_dict(state["policy"])  # before setup, once: e.g. ESFT's saved selection, DMEP's prune
        return {"dir": found, "info": info, "state": state}

    def _setup(self, saved: dict | None) -> None:
        c = self.config
        self.stats = RoutingStats(self.world.all_reduce if self.world.distributed else None)
        ctx = Context(self.data, c.batch_size, self.steps_per_epoch, c.steps, self.device, c.seed, self._say,
                      self.stats, part=self.part, all_reduce=self.world.all_reduce, stats_tokens=c.stats_tokens)
        saved_draws = self.policy.generator.get_state()  # (resuming: the saved run's, loaded by _load)
        self.policy.setup(self.model, ctx)
        if saved is not None:
            ckpt.apply_layout(self.model, saved["info"]["layout"])
            # setup drew initial adapters that the saved layout and weights replace: its draws do not count
            self.policy.generator.set_state(saved_draws)
        self.parallel = strategy.parallelize(self.model, self.world, c, self.device, self._base_fingerprint)
        self.compiled = compile_layers(self.model) if c.compile else None  # after sharding, as torchtitan
        params = self.policy.trainable_parameters(self.model)
        if not params:
            raise TrainingError(f"policy {c.policy} left nothing to train")
        self.optimizer = AdamW(params, lr=c.lr, weight_decay=c.weight_decay,  # per-row steps: adamw.py
                               fused=self.device.startswith("cuda") or None)
        self.scheduler = lr_schedule(self.optimizer, c.steps, c.warmup_ratio, c.schedule)

    def resume(self, saved: dict) -> None:
        """Weights, optimizer, schedule, statistics, data position and RNG from the checkpoint ``_load`` read;
        the logs cut back to its step; a new ``--steps`` stretches the schedule from here."""
        state = ckpt.load_checkpoint(saved["dir"], self.model, self.optimizer, self.scheduler, saved["state"])
        self.stats.load_state_dict(ckpt.routing_stats_state(state))
        self.data.load_state_dict(state["data"])
        self.step = saved["info"]["step"]
        for stale in self.run.remove_temporaries():
            self._say(f"removed {stale}: left by a write that was interrupted")
        # what the flags of this resume change: the schedule (--steps, --lr, --schedule, --warmup-ratio) continues
        # from this step as asked; weight decay applies from the next step (config.RESUME_MAY_CHANGE)
        planned = {**LEGACY_ARGS, **saved["info"]["args"]}
        events = [e for e in [rebase(self.optimizer, self.scheduler, planned, self.config)] if e]
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.config.weight_decay
        for e in events:
            what = ", ".join(f"--{k.replace('_', '-')} {new} (was {old})" for k, (old, new) in e["changed"].items())
            self._say(f"{what}: the learning rate goes from {e['lr_before']:.3g} to {e['lr_after']:.3g} at step "
                      f"{self.step + 1}, then follows the {self.config.schedule} schedule of a "
                      f"{self.config.steps}-step run with peak {self.config.lr:g}")
        try:
            for note in self.run.truncate_logs(self.step):
                self._say(note)
        except RunDirError as e:
            raise TrainingError(str(e)) from None
        self._start_trackers()
        for event in events:  # logged after the logs are cut back to this step
            self._event(event)

    def _start(self) -> None:
        self.run.clear()
        if self._preset_base is not None:
            self.run.write_preset_base(self.model, self._preset_base, self.tok)
        self._preset_base = None
        # what the run was asked for, every policy option resolved (the paper's defaults included), and the
        # same as a TOML file that --config accepts: any run can be repeated
        options = dataclasses.asdict(self.policy.config)
        config = dataclasses.asdict(self.config)
        self.run.write_json("args.json", {**config, "policy_options": options, "world_size": self.world.size,
                                          "global_batch": self.global_batch})
        train = {k: v for k, v in config.items() if k not in ("policy_options", "resume", "overwrite")}
        self.run.write_text("config.toml", to_toml({"train": train, self.config.policy: options}))
        self._start_trackers()
        for event in self.policy.start_events(self.model):
            self._event(event)

    # --- messages, events, checkpoints -------------------------------------------------------------
    def _event(self, record: dict) -> None:
        self.run.append(EVENTS, record)
        self.trackers.event(record)
        line = self.policy.event_line(record)
        if line:
            self._say(line)

    def _log_compiles(self) -> None:
        """--compile: the graphs compiled since the last call (the first compile, recompiles after a resize)."""
        compiled = self.compiled.update() if self.compiled else None
        if compiled:
            self._event({"event": "compile", "step": self.step, **compiled})
            self._say(compile_line(self.step, compiled, len(self.model.layers)))

    def _start_trackers(self) -> None:
        """--report-to: the first process's trackers (a resumed run continues its tracker runs)."""
        config = {**dataclasses.asdict(self.config), "policy_options": dataclasses.asdict(self.policy.config)}
        try:
            self.trackers = Trackers(self.config.report_to if self.run.writer else (), self.run, config, self.step)
        except TrackerError as e:
            raise TrainingError(str(e)) from None

    def _say(self, line: str) -> None:
        """A line for the user, above the progress bar (not through it); the writer's process only."""
        if self.run.writer:
            from tqdm.auto import tqdm

            tqdm.write(line)

    def save(self) -> Path:
        """Checkpoint the run; non-finite weights or optimizer state are never written (the run stops)."""
        trained = [p for g in self.optimizer.param_groups for p in g["params"]]
        moments = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
        if self.world.any(not (_finite(trained) and _finite(moments)), self.device):
            self._stop_non_finite(f"weights or optimizer state at step {self.step}: not saved")
        self.stats.sync()
        info = {"step": self.step, "policy": self.config.policy, "args": dataclasses.asdict(self.config),
                "world_size": self.world.size, "global_batch": self.global_batch,
                "data": self.data.state_dict(), "trainable": self.model.num_parameters(trainable_only=True)}
        state = {"policy": self.policy.state_dict(), "stats": self.stats.state_dict(), "data": self.data.state_dict()}
        with self.stops.saving():  # a signal waits for the checkpoint
            path = self.run.save_checkpoint(self.model, self.optimizer, self.scheduler, info, state)
        self._saved_step = self.step
        return path

    def _watch_divergence(self, loss: float) -> None:
        """Stop when the loss has diverged (``stopping.DivergenceWatch``): the weights are not saved, the last
        good checkpoint stays."""
        if diverged := self._divergence.check(loss, self.step, self.run.checkpoint_dir):
            self._event(diverged[0])
            raise TrainingError(diverged[1])

    def _stop_non_finite(self, what: str) -> None:
        """Stop before the optimizer steps on it: the weights, and the last checkpoint, stay good."""
        self.optimizer.zero_grad(set_to_none=True)
        last = self.run.checkpoint_dir
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        raise TrainingError(f"non-finite {what}: stopping; {kept}. Try a lower --lr or --max-grad-norm.")

    # --- the loop ------------------------------------------------------------------------------
    def train_step(self) -> dict:
        c = self.config
        model, opt = self.model, self.optimizer
        model.train()
        total, tokens, extra_total = 0.0, 0, 0.0
        batches = [self.data.next_batch(c.batch_size, self.part).to(self.device) for _ in range(c.grad_accum)]
        # each micro-batch's mean loss weighs by its share of the step's target tokens over every process, so
        # that --grad-accum G with --batch-size B on N processes trains like one batch of G*B*N (the gradients
        # are then summed over the processes)
        targets = [int((b.labels[:, 1:] != -100).sum()) for b in batches]
        step_targets = self.world.sum(sum(targets), self.device)
        for micro, batch in enumerate(batches):
            self.parallel.sync_gradients(model, micro == len(batches) - 1)  # sharded gradients: once a step
            weight = targets[micro] / max(1, step_targets)
            mask = batch.loss_mask if c.stats_tokens == "response" else batch.attention_mask
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
                out = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                            position_ids=batch.position_ids, output_router=self.policy.needs_router,
                            token_mask=mask)
            # (a micro-batch with no target tokens, e.g. all prompt, contributes nothing, not a NaN mean)
            objective = out.loss * weight if targets[micro] else out.logits.sum() * 0.0
            extra = self.policy.extra_loss(out, mask)  # e.g. DMEP's LB loss: a mean per micro-batch
            if extra is not None:
                objective = objective + extra / c.grad_accum
                extra_total += extra.item() / c.grad_accum
            loss_value = objective.detach()
            if not torch.isfinite(loss_value):
                self._stop_non_finite(f"loss ({loss_value.item()}) at step {self.step + 1}, micro-batch {micro}")
            objective.backward()
            if self.policy.needs_router:
                self.stats.observe(out, mask)
            self.policy.observe(out, mask)
            total += out.loss.item() * weight if targets[micro] else 0.0
            tokens += int(batch.attention_mask.sum())
        params = [p for g in opt.param_groups for p in g["params"]]
        # several processes: the gradient of the global batch (FSDP has reduce-scattered the sharded ones)
        self.world.all_reduce_grads(self.parallel.replicated(params))
        total, extra_total, tokens = self.world.sum_all([total, extra_total, tokens], self.device)
        # the norm is taken even without clipping: a finite loss can still give inf/NaN gradients, and
        # stepping on them would put NaN weights into the next checkpoint
        clip = c.max_grad_norm if c.max_grad_norm > 0 else math.inf
        grad_norm = float(self.parallel.full(torch.nn.utils.clip_grad_norm_(params, clip)))
        if not math.isfinite(grad_norm):
            self._stop_non_finite(f"gradient norm ({grad_norm}) at step {self.step + 1}")
        lr = opt.param_groups[0]["lr"]
        try:
            opt.step()
        except RuntimeError as e:  # e.g. --lr 1e38: the step size overflows inside AdamW
            self._stop_non_finite(f"optimizer step ({str(e)[:120]}) at step {self.step + 1}")
        if self.world.any(not _finite(params), self.device):
            self._stop_non_finite(f"weights after the optimizer step {self.step + 1}")
        self.scheduler.step()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        self.stats.sync()  # several processes: every rank decides on the same, reduced, statistics
        events = list(self.policy.after_step(self.step, model, opt))
        for event in events:
            self._event(event)
        self._log_compiles()
        if events or self._trainable is None:  # the count changes only with an event (prune, grow, slice)
            self._trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                "policy_loss": extra_total, "trainable": self._trainable, **self.policy.metrics()}

    def train(self) -> dict:
        """Run the steps up to ``--steps`` (or ``--stop-at``), checkpointing as asked; returns the summary. The
        run directory's lock is given up when it returns or fails."""
        if not self.ready:
            self.setup()
        try:
            with self.stops:
                return self._train()
        finally:
            self.release()

    def _stop_on_request(self, bar, preempted: bool) -> dict:
        """A stop asked for (on any process): checkpoint this step on every process, then stop."""
        bar.close()
        path = self.save() if self._saved_step != self.step else self.run.checkpoint_dir
        code = PREEMPTED if preempted else INTERRUPTED
        self.world.print(f"\n{'preempted' if preempted else 'interrupted'}: saved step {self.step} to {path}; "
                         f"continue with --resume {self.run} (exit status {code})", flush=True)
        return {"interrupted": True, "step": self.step, "exit_code": code}

    def _train(self) -> dict:
        c = self.config
        start, t0, tokens = self.step, time.perf_counter(), 0
        bar = StepDisplay(c.policy, self.step, c.steps, c.log_every, self.show_progress and self.run.writer)
        record = {}
        self._divergence = DivergenceWatch(c.divergence_factor, c.divergence_patience)
        self._in_step = False
        try:
            end = min(c.steps, c.stop_at) if c.stop_at else c.steps
            while self.step < end:
                # a stop asked for on any process stops all at the same step boundary (and is a preemption if
                # any of them was preempted)
                asked, preempted = self.world.sum_all([int(self.stops.requested), int(self.stops.preempted)],
                                                      self.device)
                if asked:
                    return self._stop_on_request(bar, preempted > 0)
                t = time.perf_counter()
                self._in_step = True
                record = self.train_step()
                self._in_step = False
                dt = time.perf_counter() - t
                tokens += record["tokens"]
                record["tokens_per_s"] = record["tokens"] / dt
                record["elapsed_s"] = time.perf_counter() - t0
                self.run.append(METRICS, record)
                self.trackers.log(record)
                self._watch_divergence(record["loss"])
                bar.step(record, last=self.step == end)
                if c.save_every and self.step % c.save_every == 0 and self.step < end:
                    if self._divergence.streak:  # the loss is above its running median: keep the last checkpoint
                        self._say(f"step {self.step}: not checkpointed while the loss is {record['loss']:.4g}, "
                                  f"above its running median for {self._divergence.streak} step(s)")
                    else:
                        self.save()
        except KeyboardInterrupt:  # Ctrl-C pressed again: at once
            bar.close()
            if self._in_step:  # data drawn, statistics counted, maybe a half-applied event: save nothing
                last = self.run.locate_checkpoint()
                kept = f"the last checkpoint ({last}) is kept" if last.exists() else "no checkpoint was written"
                self.world.print(f"\ninterrupted inside step {self.step + 1}: nothing saved from it; {kept}")
                return {"interrupted": True, "step": ckpt.read_info(last)["step"] if last.exists() else 0,
                        "exit_code": INTERRUPTED}
            return self._stop_on_request(bar, self.stops.preempted)
        bar.close()
        if self.step >= c.steps:  # the end of training (not a --stop-at): e.g. EPnG's importance probe
            for event in self.policy.end_events(self.model, self.step):
                self._event(event)
            self._log_compiles()
        trained = self.parallel.replicated([p for g in self.optimizer.param_groups for p in g["params"]])
        if not self.world.replicas_agree(trained):
            raise TrainingError("the trained parameters differ between processes: the run is not data-parallel "
                                "(a bug, or different code or data on some process); nothing was saved")
        path = self.save()
        elapsed = time.perf_counter() - t0
        if "loss" not in record:  # no step in this session (a run resumed only to finish its export)
            record = (self.run.read_log(METRICS) or [{}])[-1]
        summary = {"policy": c.policy, "model": c.model, "steps": self.step, "final_loss": record.get("loss"),
                   "trainable_parameters": self.model.num_parameters(trainable_only=True),
                   "total_parameters": self.model.num_parameters(),
                   # tokens of every process (the metrics' tokens are already summed over them)
                   "tokens_per_s": tokens / elapsed if elapsed > 0 and self.step > start else None,
                   "startup_s": self.startup_s, "train_s": elapsed,
                   "processes": self.world.size, "global_batch": self.global_batch, "replicas_agree": True,
                   "peak_memory_mb": self.world.gather(peak_memory_mb(self.device)),  # per process, rank order
                   "events": self.run.count(EVENTS), "checkpoint": str(path),
                   **({"compile": self.compiled.total()} if self.compiled else {})}
        with self.stops.saving():  # the run is complete once these are written: a signal now waits for them
            summary["export"] = str(self.run.export(self.model, self.parallel.base_fingerprint))
            self.run.write_summary(summary)
        self.trackers.summary(summary)
        return summary
