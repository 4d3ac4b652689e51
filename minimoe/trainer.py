"""The training loop behind ``train.py``: written out, one optimizer step at a time.

    for step in 1..steps:
        for each micro-batch: forward (routing info if the policy reads it), loss = CE + policy loss,
                              backward, policy.observe(...)
        clip, optimizer.step, scheduler.step, zero_grad
        policy.after_step(step)   ← the only place the model may change shape
        metrics.jsonl line; checkpoint every save_every steps

Run directory: ``args.json``, ``metrics.jsonl`` (one line per step), ``events.jsonl`` (one line per
prune / grow / slice / selection / routing measurement), ``checkpoint/``, ``summary.json``, and at the
end ``adapter/`` (``minimoe.save_adapter``) or, for full fine-tuning, ``model/`` (Hub layout); ``base/``
holds the base model when it was built on the fly from a preset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import PRESETS, preset
from .data import Dataset, load_pairs
from .files import write_text_atomic
from .hf import from_pretrained, resolve
from .model import CausalLM
from .policies import Context, Policy, make_policy
from .stats import RoutingStats
from .tokenizer import Tokenizer, byte_tokenizer, load_tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TrainingError(RuntimeError):
    """The run cannot continue (bad arguments, non-finite loss, existing run directory)."""


@dataclass
class TrainConfig:
    """Arguments of a run (``train.py --help`` documents each; TOML keys use the same names)."""

    policy: str = "epng"
    model: str = ""  # Hub id, directory, or a tiny preset name (random init) — default by policy
    data: str = "tiny-arith"  # JSONL file or built-in set
    out: str = ""  # run directory (default runs/<policy>)
    steps: int = 500  # optimizer steps (EPnG App. A.3: 500)
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate (EPnG App. A.3)
    warmup_ratio: float = 0.1  # linear warm-up share of the steps, then cosine decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_len: int = 256  # tokens per example (DMEP §IV)
    packing: bool = False  # concatenate examples into max_len rows
    stats_tokens: str = "response"  # which tokens feed routing statistics: response | all
    seed: int = 0
    save_every: int = 0  # also checkpoint every N steps (0: only at the end)
    stop_at: int = 0  # stop (and checkpoint) after this step of the schedule; 0 = run all steps
    log_every: int = 1  # progress-bar refresh interval
    gradient_checkpointing: bool = False
    device: str = ""  # default: cuda if available, else cpu
    dtype: str = "float32"  # base weights: float32, or bfloat16 (adapter policies; adapters stay fp32)
    overwrite: bool = False  # replace an existing run directory
    eval_limit: int = 100  # with --data tiny-arith: test problems scored before and after training
    resume: str = ""  # continue the run in this directory
    policy_options: dict = field(default_factory=dict)

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def default_model(policy: str) -> str:
    return "tiny-qwen3" if policy == "dmep" else "tiny-olmoe"


def is_preset(name: str) -> bool:
    """A tiny preset name (random weights), unless a directory of that name exists."""
    return name in PRESETS and not Path(name).exists()


def load_model_and_tokenizer(name: str, device: str, seed: int, base_dir: Path | None = None,
                             dtype: torch.dtype = torch.float32) -> tuple[CausalLM, Tokenizer]:
    """A checkpoint directory or Hub id, or a tiny preset with random weights and a byte tokenizer.
    A preset model is named after ``base_dir``, where the trainer writes it (``write_preset_base``) so
    exports and eval have a base on disk."""
    if is_preset(name):
        tok = byte_tokenizer()
        vocab = -(-tok.vocab_size // 16) * 16
        config = preset(name, vocab_size=vocab, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        model = CausalLM(config).to(device=device, dtype=dtype)
        if base_dir is not None:
            model.config = model.config.replace(name_or_path=str(base_dir))
        return model, tok
    return from_pretrained(name, dtype=dtype, device=device), load_tokenizer(name)


def write_preset_base(model: CausalLM, state: dict, tok: Tokenizer, base_dir: Path) -> None:
    """The on-the-fly preset base (``state``: its weights before any adapter) in Hub layout, written
    atomically: a crash never leaves a ``base/`` that looks complete."""
    from .export import write_hub_checkpoint
    from .files import atomic_dir

    with atomic_dir(base_dir) as tmp:
        write_hub_checkpoint(model, state, tmp, source=None)
        tok.save(tmp)


def cosine_schedule(optimizer, steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(round(warmup_ratio * steps))) if warmup_ratio > 0 else 0

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    def __init__(self, config: TrainConfig, show_progress: bool = True):
        self.config = c = config
        self.show_progress = show_progress
        self.device = c.resolved_device()
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise TrainingError(f"--device {self.device!r}: not a device (cpu, cuda, cuda:N)") from None
        if device.type not in ("cpu", "cuda"):
            raise TrainingError(f"--device {self.device}: minimoe trains on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError(f"--device {self.device}: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingError(f"--device {self.device}: this machine has {torch.cuda.device_count()} GPU(s)")
        if c.stats_tokens not in ("response", "all"):
            raise TrainingError(f"stats_tokens {c.stats_tokens!r}: choose response or all")
        if c.dtype not in DTYPES:
            raise TrainingError(f"--dtype {c.dtype!r}: choose from {', '.join(DTYPES)}")
        if c.dtype != "float32" and c.policy in ("full", "esft"):
            # AdamW updates of bf16 weights round most small steps away; these policies train base weights
            raise TrainingError(f"--dtype {c.dtype} with --policy {c.policy}: the trained weights would be "
                                "bf16 without fp32 master copies; use --dtype float32 (bf16 autocast runs on CUDA)")
        if c.resume:
            self.run_dir = Path(c.resume)
        else:
            self.run_dir = Path(c.out or f"runs/{c.policy}")
            self._check_run_dir()
        c.model = c.model or default_model(c.policy)
        # bad input fails here, before anything on disk changes
        if not is_preset(c.model):
            resolve(c.model)
        pairs = load_pairs(c.data, c.seed)
        self.policy: Policy = make_policy(c.policy, c.policy_options)
        torch.manual_seed(c.seed)
        self.model, self.tok = load_model_and_tokenizer(c.model, self.device, c.seed, self.run_dir / "base",
                                                        DTYPES[c.dtype])
        preset_base = None  # a preset's random base, kept (tiny) until the run directory may be written
        if not c.resume and is_preset(c.model):
            preset_base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.gradient_checkpointing = c.gradient_checkpointing
        self.data = Dataset.build(pairs, self.tok, c.max_len, c.packing, c.seed)
        self.steps_per_epoch = max(1, math.ceil(len(self.data) / (c.batch_size * c.grad_accum)))
        self.policy.generator.manual_seed(c.seed)
        self.step = 0
        state = None
        if c.resume:
            found = ckpt.locate(self.run_dir)
            info = ckpt.read_info(found)
            if info["policy"] != c.policy:
                raise TrainingError(f"--resume {self.run_dir}: the run used policy {info['policy']}, not {c.policy}")
            state = torch.load(found / "state.pt", map_location="cpu", weights_only=False)
            self.policy.load_state_dict(state["policy"])
        self.stats = RoutingStats()
        ctx = Context(self.data, c.batch_size, self.steps_per_epoch, c.steps, self.device, c.seed, self._say,
                      self.stats)
        self.policy.setup(self.model, ctx)
        if c.resume:
            ckpt.apply_layout(self.model, info["layout"])
            self.policy.load_state_dict(state["policy"])  # setup drew from the policy's generator: restore it
        params = self.policy.trainable_parameters(self.model)
        if not params:
            raise TrainingError(f"policy {c.policy} left nothing to train")
        if not c.resume:
            # only now, with the model loaded and the policy set up: a bad flag, file or target above
            # never costs an existing run
            self._clear_run_dir()
            if preset_base is not None:
                write_preset_base(self.model, preset_base, self.tok, self.run_dir / "base")
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay,
                                           fused=self.device.startswith("cuda") or None)
        self.scheduler = cosine_schedule(self.optimizer, c.steps, c.warmup_ratio)
        if c.resume:
            state = ckpt.load_checkpoint(found, self.model, self.optimizer, self.scheduler)
            self.stats.load_state_dict(ckpt.routing_stats_state(state))
            self.data.load_state_dict(state["data"])
            self.step = info["step"]
            # the saved lr was computed under the saved --steps; a new --steps takes effect from this step
            for group, base, f in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                      self.scheduler.lr_lambdas, strict=True):
                group["lr"] = base * f(self.scheduler.last_epoch)
            self._truncate_logs(self.step)
        else:
            write_text_atomic(self.run_dir / "args.json", json.dumps(dataclasses.asdict(c), indent=1))
            if hasattr(self.policy, "selection_event"):
                self._event(self.policy.selection_event())

    # --- run directory ---------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        if self.run_dir.exists() and any(self.run_dir.iterdir()) and not self.config.overwrite:
            raise TrainingError(f"run directory {self.run_dir} exists and is not empty; pass --overwrite to "
                                f"replace it or --resume {self.run_dir} to continue it")

    def _clear_run_dir(self) -> None:
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _truncate_logs(self, step: int) -> None:
        """On resume, drop log lines written after the checkpoint's step."""
        for name in ("metrics.jsonl", "events.jsonl"):
            f = self.run_dir / name
            if f.is_file():
                keep = [line for line in f.read_text().splitlines() if line and json.loads(line)["step"] <= step]
                write_text_atomic(f, "".join(line + "\n" for line in keep))

    def _append(self, name: str, record: dict) -> None:
        with (self.run_dir / name).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _event(self, record: dict) -> None:
        self._append("events.jsonl", record)
        line = self.policy.event_line(record)
        if line:
            self._say(line)

    def _say(self, line: str) -> None:
        """A line for the user, above the progress bar (not through it)."""
        from tqdm.auto import tqdm

        tqdm.write(line)

    def save(self) -> Path:
        info = {"step": self.step, "policy": self.config.policy, "args": dataclasses.asdict(self.config),
                "data": self.data.state_dict(), "trainable": self.model.num_parameters(trainable_only=True)}
        self.stats.sync()
        state = {"policy": self.policy.state_dict(), "stats": self.stats.state_dict(), "data": self.data.state_dict()}
        return ckpt.save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, info, state)

    def _on_sigint(self, signum, frame) -> None:
        """First Ctrl-C: finish the current step, save, stop. Second: stop at once (saving nothing of
        the step in progress)."""
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\nCtrl-C: finishing this step, then saving (press again to stop at once)", flush=True)

    def _stop_non_finite(self, what: str) -> None:
        """Stop before the optimizer steps on it: the weights, and the last checkpoint, stay good."""
        self.optimizer.zero_grad(set_to_none=True)
        last = self.run_dir / ckpt.CHECKPOINT
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        raise TrainingError(f"non-finite {what}: stopping; {kept}. Try a lower --lr or --max-grad-norm.")

    # --- the loop ------------------------------------------------------------------------------
    def train_step(self) -> dict:
        c = self.config
        model, opt = self.model, self.optimizer
        model.train()
        total, tokens, extra_total = 0.0, 0, 0.0
        batches = [self.data.next_batch(c.batch_size).to(self.device) for _ in range(c.grad_accum)]
        # each micro-batch's mean loss weighs by its share of the step's target tokens, so that
        # --grad-accum G with --batch-size B trains like one batch of G*B
        targets = [int((b.labels[:, 1:] != -100).sum()) for b in batches]
        for micro, batch in enumerate(batches):
            weight = targets[micro] / max(1, sum(targets))
            mask = batch.loss_mask if c.stats_tokens == "response" else batch.attention_mask
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
                out = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                            output_router=self.policy.needs_router, token_mask=mask)
            # (a micro-batch with no target tokens, e.g. all prompt, contributes nothing, not a NaN mean)
            objective = out.loss * weight if targets[micro] else out.logits.sum() * 0.0
            extra = self.policy.extra_loss(out)  # e.g. DMEP's LB loss: a mean per micro-batch
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
        # the norm is taken even without clipping: a finite loss can still give inf/NaN gradients, and
        # stepping on them would put NaN weights into the next checkpoint
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm > 0 else math.inf))
        if not math.isfinite(grad_norm):
            self._stop_non_finite(f"gradient norm ({grad_norm}) at step {self.step + 1}")
        lr = opt.param_groups[0]["lr"]
        opt.step()
        self.scheduler.step()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        self.stats.sync()  # several processes: every rank decides on the same, reduced, statistics
        for event in self.policy.after_step(self.step, model, opt):
            self._event(event)
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                "policy_loss": extra_total, "trainable": sum(p.numel() for g in opt.param_groups for p in g["params"]),
                **self.policy.metrics()}

    def train(self) -> dict:
        from tqdm.auto import tqdm

        c = self.config
        start, t0, tokens = self.step, time.perf_counter(), 0
        bar = tqdm(total=c.steps, initial=self.step, disable=not self.show_progress, dynamic_ncols=True,
                   desc=f"{c.policy}")
        record = {}
        self._stop_requested, self._in_step = False, False
        handler = None
        if threading.current_thread() is threading.main_thread():
            handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            end = min(c.steps, c.stop_at) if c.stop_at else c.steps
            while self.step < end:
                if self._stop_requested:
                    raise KeyboardInterrupt
                t = time.perf_counter()
                self._in_step = True
                record = self.train_step()
                self._in_step = False
                dt = time.perf_counter() - t
                tokens += record["tokens"]
                record["tokens_per_s"] = record["tokens"] / dt
                record["elapsed_s"] = time.perf_counter() - t0
                self._append("metrics.jsonl", record)
                bar.update(1)
                if self.step % c.log_every == 0:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", trainable=f"{record['trainable']:,}")
                if c.save_every and self.step % c.save_every == 0 and self.step < end:
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            if self._in_step:  # data drawn, statistics counted, maybe a half-applied event: save nothing
                last = ckpt.locate(self.run_dir)
                kept = f"the last checkpoint ({last}) is kept" if last.exists() else "no checkpoint was written"
                print(f"\ninterrupted inside step {self.step + 1}: nothing saved from it; {kept}")
                return {"interrupted": True, "step": ckpt.read_info(last)["step"] if last.exists() else 0}
            path = self.save()
            print(f"\ninterrupted: saved step {self.step} to {path}; continue with --resume {self.run_dir}")
            return {"interrupted": True, "step": self.step}
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)
        bar.close()
        path = self.save()
        elapsed = time.perf_counter() - t0
        events = self.run_dir / "events.jsonl"
        summary = {"policy": c.policy, "model": c.model, "steps": self.step, "final_loss": record.get("loss"),
                   "trainable_parameters": self.model.num_parameters(trainable_only=True),
                   "total_parameters": self.model.num_parameters(),
                   "tokens_per_s": tokens / elapsed if elapsed > 0 and self.step > start else None,
                   "events": sum(1 for _ in events.open()) if events.exists() else 0,
                   "checkpoint": str(path)}
        summary["export"] = str(self.export())
        write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary

    def export(self) -> Path:
        """The run's fine-tune in a loadable form: ``adapter/`` (adapters, ESFT experts) or ``model/``
        (full fine-tuning, Hub layout)."""
        from .adapter_io import adapter_config, save_adapter
        from .export import export_merged

        if adapter_config(self.model)["kinds"]:
            return save_adapter(self.model, self.run_dir / "adapter", overwrite=True)
        return export_merged(self.model, self.run_dir / "model", overwrite=True)
