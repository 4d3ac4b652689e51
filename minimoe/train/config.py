"""What a training run is asked to do: ``TrainConfig``, and ``resolve()``, which builds it from the layers a
user can set, in order of precedence:

    the fields' defaults (the papers')  <  the embedded model's scaled defaults (no --model given)
                                        <  a resumed run's saved arguments  <  a TOML file  <  the command line

Every field carries its ``--help`` text and choices (``options.option``), as policy options do, so the
command line, TOML files and checks come from one definition. ``minimoe train`` is a thin command over this;
recipes and tests call ``resolve`` directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from ..model.config import PRESETS
from ..model.shipped import shipped, shipped_name
from ..parallel.distributed import launched
from ..parallel.watchdog import DEFAULT_TIMEOUT_S
from ..utils.options import add_arguments, checked, option
from ..policies import POLICIES
from .recipes import get_recipe, listing
from .sweeps import SWEEPS, listing as sweep_listing
from .trackers import TRACKERS

# With no --model, train fine-tunes a shipped tiny model (``minimoe/weights``: tiny-moe, or for DMEP, whose
# paper adapts a dense Qwen3, tiny-dense) on tiny-arith with the papers' methods at a scale that finishes
# in minutes on a CPU (flags given explicitly still win). EPnG keeps the
# paper's own T_w = 100, T_p = 50: 5 prune/grow events in 300 steps. (Scaling the paper's 500-step schedule
# instead -- T_w = 60, T_p = 30, 9 events -- prunes ~81% of the 32 adapted experts and scored 0.06 vs 0.39 on
# tiny-arith, mean of 3 seeds: see docs/reproducing.md.)
EMBEDDED_MODELS = {"dmep": "tiny-dense"}  # the others: tiny-moe
EMBEDDED_RUN = {"steps": 300, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.05}
EMBEDDED_OPTIONS = {"esft": {"sample_batches": 8}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PLAN_FLAGS = ("plan", "gpu_memory", "json")  # --plan [--gpu-memory SIZE] [--json]: a plan instead of the run
SCHEDULES = ("linear", "cosine", "constant")
# What a run resumed from a checkpoint written before a default changed gets for the arguments it lacks: the
# behaviour it was trained with (2026-12: cosine schedule; DMEP's LB loss summed over modules; EPnG's event at
# the last step; ESFT's per-layer normalisation was saved with every run already)
LEGACY_ARGS = {"schedule": "cosine", "epochs": 0.0}
LEGACY_OPTIONS = {"dmep": {"lb_reduce": "sum"}, "epng": {"final_event": True}}
# What a resume may change: each applies from the resumed step (the schedule's four continue from it on the new
# schedule: schedule.rebase). Any other field or policy option given with another value than the run's is
# refused, naming it: it would be ignored (the saved state wins) or train another run than this one (its data,
# base, adapters, order). --out and --overwrite do not go with --resume.
RESUME_MAY_CHANGE = ("steps", "lr", "schedule", "warmup_ratio", "weight_decay", "max_grad_norm", "batch_size",
                     "grad_accum", "save_every", "stop_at", "log_every", "eval_limit", "divergence_factor",
                     "divergence_patience", "gradient_checkpointing", "report_to", "compile", "fsdp", "dist_timeout",
                     "device", "dtype")


class TrainingError(RuntimeError):
    """The run cannot continue (bad arguments, non-finite loss, existing run directory)."""


def check_device(name: str) -> str:
    """``name`` if this machine can train on it, else a TrainingError naming ``--device``."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"--device {name!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"--device {name}: minimoe trains on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainingError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return name


@dataclass
class TrainConfig:
    """Arguments of a run (``minimoe train --help`` shows each field's text; TOML keys use the same names)."""

    policy: str = option("epng", "training method: " + ", ".join(POLICIES))
    model: str = option("", "Hub id, checkpoint directory, or tiny preset (tiny-olmoe, tiny-qwen2-moe, tiny-qwen3, "
                            "tiny-qwen3-moe: random weights, byte tokenizer); default: the shipped tiny-moe "
                            "(tiny-dense for dmep; both ship inside the package); a shipped model, named or by "
                            "default, trains with the embedded run's scaled defaults (--steps 300 --batch-size 16 "
                            "--lr 3e-3 --warmup-ratio 0.05)")
    data: str = option("tiny-arith", "data file (JSON, JSONL, .gz, Parquet) or Hub dataset (hf://datasets/OWNER/NAME/"
                                     "FILE, OWNER/NAME:FILE, OWNER/NAME[:DIR]@SPLIT) of MetaMathQA, GSM8K, Code Alpaca, "
                                     "MATH, prompt/response or chat-messages records; or a built-in task: "
                                     "tiny-arith, tiny-mix")
    data_filter: tuple = option((), "keep only the records whose field KEY equals VALUE (every key must match; a "
                                    "key given twice: either value); e.g. type=Algebra for MATH's algebra subset",
                                metavar="KEY=VALUE")
    answer_only: bool = option(False, "train on the final answer only: a response becomes '#### ANSWER' from the text "
                                      "after its last '####' (DMEP's GSM8K: direct answer, no chain of thought)")
    recipe: str = option("", "a paper's setting by name (model, data, schedule, batch, options: the bottom layer, "
                             "flags and TOML still win), or a sweep (a paper's analysis, one run per point: "
                             "minimoe train --recipe SWEEP --plan); 'list' prints them all")
    out: str = option("", "run directory (default runs/<policy>)")
    steps: int = option(500, "optimizer steps (EPnG App. A.3: 500; without --model: 300)", low=1)
    batch_size: int = option(8, "sequences per micro-batch (without --model: 16)", low=1)
    grad_accum: int = option(1, "micro-batches per step", low=1)
    lr: float = option(1e-4, "peak learning rate (EPnG App. A.3; without --model: 3e-3)", low=0.0)
    epochs: float = option(0.0, "passes over the training data; if > 0 it sets --steps to ceil(epochs x examples / "
                                "global batch) at the start of a run (DMEP §IV: 5)", low=0.0)
    schedule: str = option("", "learning rate after the warm-up: linear or cosine decay to 0, or constant; default: "
                               "the policy's paper's (linear for epng, lora, esft, full: EPnG App. A.3, the "
                               "transformers Trainer's; cosine for dmep: DMEP §IV)", choices=SCHEDULES)
    warmup_ratio: float = option(-1.0, "linear warm-up share of the steps; default: the policy's paper's (0 for epng, "
                                       "lora, esft, full; 0.1 for dmep; the embedded run: 0.05)", low=0.0, high=1.0)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0.0)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)", low=0.0)
    max_len: int = option(256, "tokens per example (longer ones are truncated; DMEP §IV: 256)", low=2)
    packing: bool = option(False, "pack whole examples into rows of --max-len tokens; each attends only to "
                                  "itself (positions restart per example), so losses and routing are those of "
                                  "the examples alone, without the padding (a step holds more examples)")
    group_by_length: bool = option(False, "draw each batch's examples from length-sorted chunks: the same number "
                                          "of examples per batch, with little padding")
    stats_tokens: str = option("all", "tokens counted by routing statistics (and DMEP's LB loss): all real tokens "
                                      "(padding masked; EPnG Eq. 6, DMEP Eqs. 8-9) or response (prompt masked too)",
                               choices=("all", "response"))
    seed: int = option(0, "seed for data order, adapter init and the tiny model")
    save_every: int = option(0, "also checkpoint every N steps (0: only at the end)", low=0)
    divergence_factor: float = option(1.5, "stop (keeping the last good checkpoint) when the loss stays above this "
                                           "times its running median, and 0.5 above it, for --divergence-patience "
                                           "steps in a row (median of the last 20 losses that were not; 0: never)", low=0.0)
    divergence_patience: int = option(10, "steps in a row the loss must stay diverged before the run stops", low=1)
    stop_at: int = option(0, "stop and checkpoint after this step of the schedule (continue later with --resume)", low=0)
    log_every: int = option(0, "progress every N steps: the bar's refresh on a terminal, else a plain line (logs "
                               "and files get no bar frames); default: 1 on a terminal, 10 otherwise", low=0)
    gradient_checkpointing: bool = option(False, "activation checkpointing")
    report_to: tuple = option((), "also send the metrics, events, configuration and summary to these experiment "
                                  "trackers (optional extras; the first process only): tensorboard (RUN/tensorboard), "
                                  "wandb (WANDB_MODE=offline honoured), trackio", choices=TRACKERS, metavar="TRACKER")
    compile: bool = option(False, "torch.compile each decoder block (recompiled after a prune, grow or slice; the "
                                  "count is logged); see docs/benchmarks.md for where it pays")
    fsdp: bool = option(False, "several processes: shard the base over them with FSDP2 (the adapters stay whole "
                               "on every process; full fine-tuning shards its trained weights and their state)")
    dist_timeout: float = option(DEFAULT_TIMEOUT_S, "several processes: seconds a process waits inside one "
                                                    "collective before every process stops, naming the ranks it "
                                                    "waits for (stopped, hung or gone)", low=1.0)
    device: str = option("", "cpu, cuda or cuda:N (default: cuda if available)")
    dtype: str = option("float32", "dtype of the frozen base weights: bfloat16 halves their memory (lora, epng, dmep "
                                   "only; adapters and their optimizer state stay fp32)", choices=tuple(DTYPES))
    overwrite: bool = option(False, "replace an existing run directory")
    eval_limit: int = option(100, "test problems of the built-in task (tiny-arith, tiny-mix) scored before and "
                                  "after training (0: off)", low=0)
    resume: str = option("", "continue the run in this directory (layout, weights, optimizer, data position, RNG); "
                             "its saved arguments apply unless given again")
    policy_options: dict = option({}, "options of the chosen policy (--<policy>-<option>)", cli=False)

    def __post_init__(self):
        """An unset schedule or warm-up takes the policy's paper's (``Policy.schedule``)."""
        schedule, warmup = POLICIES[self.policy].schedule if self.policy in POLICIES else ("cosine", 0.1)
        self.schedule = self.schedule or schedule
        if self.warmup_ratio < 0:
            self.warmup_ratio = warmup

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def default_model(policy: str) -> str:
    """The base a policy trains when none is named (a tiny random preset)."""
    return "tiny-qwen3" if policy == "dmep" else "tiny-olmoe"


def is_preset(name: str) -> bool:
    """A tiny preset name (random weights), unless a directory of that name exists."""
    return name in PRESETS and not Path(name).exists()


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of every TrainConfig field and of every policy option (``--<policy>-<option>``)."""
    p = argparse.ArgumentParser(prog="minimoe train", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="TOML file: [train] table (or top-level keys) and a table per policy")
    add_arguments(p, TrainConfig)
    plan = p.add_argument_group("instead of training", "print the run's memory plan (minimoe plan) and exit")
    plan.add_argument("--plan", action="store_true", help="the memory per process this run needs; nothing is "
                      "downloaded but config.json (exit status 1 when it does not fit)")
    plan.add_argument("--gpu-memory", metavar="SIZE", help="with --plan: one GPU's memory, e.g. 80GiB (default: "
                      "the GPU's own, on CUDA)")
    plan.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    for name, cls in POLICIES.items():
        if dataclasses.fields(cls.Config):
            group = p.add_argument_group(f"{name} options",
                                         cls.__doc__.strip().splitlines()[0] if cls.__doc__ else None)
            add_arguments(group, cls.Config, flag_prefix=f"{name}_", dest_prefix=f"{name}.")
    return p


def _read_toml(path: Path, fail) -> tuple[dict, dict]:
    """``[train]`` (or top-level) keys and one table per policy from a TOML file."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        fail(f"--config {path}: no such file")
    except tomllib.TOMLDecodeError as e:
        fail(f"--config {path}: {e}")
    train, options = {}, {}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"policy_options"}
    for key, value in doc.items():
        if key == "train" and isinstance(value, dict):
            train.update(value)
        elif key in POLICIES and isinstance(value, dict):
            options[key] = dict(value)
        elif key in train_fields:
            train[key] = value
        else:
            fail(f"--config {path}: unknown key {key!r} (train keys: {sorted(train_fields)}; "
                 f"policy tables: {list(POLICIES)})")
    unknown = [k for k in train if k not in train_fields]
    if unknown:
        fail(f"--config {path}: unknown [train] keys {unknown}")
    return train, options


def processes() -> int:
    """How many training processes torchrun started (1 without torchrun)."""
    return launched()[1]


def _resumed_batch_size(run, batch_size: int, saved_world: int, given: bool, fail) -> int:
    """A run resumed on another number of processes keeps its global batch: the per-process batch becomes
    ``batch_size * saved_world / world`` (unless --batch-size is given again), or the resume is refused."""
    world = processes()
    if world == saved_world or given:
        return batch_size
    global_batch = batch_size * saved_world
    if global_batch % world:
        fail(f"--resume {run}: the run's micro-batches hold {global_batch} sequences ({saved_world} processes x "
             f"--batch-size {batch_size}), which {world} processes cannot share evenly; pass --batch-size "
             f"(and --grad-accum) to choose a new global batch")
    return global_batch // world


def resolve(argv=None, description: str | None = None, embedded: bool = True) -> TrainConfig:
    """A TrainConfig from command-line arguments (see the module docstring for the layers).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        description: the ``--help`` text above the flags.
        embedded: without ``--model`` (and not resuming) the run trains the shipped ``tiny-moe``
            (``EMBEDDED_MODELS``: ``tiny-dense`` for dmep, ``minimoe.model.shipped``); a shipped model, by
            default or named (``--model tiny-dense --policy lora``), trains with ``EMBEDDED_RUN``'s defaults.
            False: an unnamed model stays unset (the policy's tiny random preset, as in the Python API).
    """
    p = build_parser(description)
    args = vars(p.parse_args(argv))
    for key in PLAN_FLAGS:  # the command's, not the run's (minimoe.cli.train reads them)
        args.pop(key)
    train, options = _read_toml(args["config"], p.error) if args.get("config") else ({}, {})
    resume = args.get("resume") or train.get("resume")
    if resume:  # a resumed run keeps its own arguments; flags given now override them
        try:
            info = ckpt.read_info(ckpt.locate(resume))
        except FileNotFoundError as e:
            p.error(f"--resume {resume}: {e}")
        saved = info["args"]
        given_batch = args.get("batch_size") is not None or "batch_size" in train
        saved["batch_size"] = _resumed_batch_size(resume, saved["batch_size"], info.get("world_size", 1),
                                                  given_batch, p.error)
        legacy = "schedule" not in saved  # (saved before 2026-12-02: its options are only those given then)
        saved = {**LEGACY_ARGS, **saved}
        saved_options = {**(LEGACY_OPTIONS.get(saved["policy"], {}) if legacy else {}),
                         **saved.pop("policy_options", {})}
        for key in ("resume", "overwrite", "out", "stop_at"):
            saved.pop(key, None)
        run_args, run_options = dict(saved), dict(saved_options)
        if (asked := args.get("policy") or train.get("policy")) and asked != saved["policy"]:
            p.error(f"--resume {resume}: a resumed run cannot change --policy {asked!r} (the run's: "
                    f"{saved['policy']!r}); start another run with --out")
        if stray := [f"--{k}" for k in ("out", "overwrite") if args.get(k) or train.get(k)]:
            p.error(f"--resume {resume}: {' and '.join(stray)} do not go with --resume (the run continues in its "
                    "own directory)")
        train = {**saved, **train}
        options = {saved["policy"]: {**saved_options, **options.get(saved["policy"], {})},
                   **{k: v for k, v in options.items() if k != saved["policy"]}}
    recipe = args.get("recipe") or train.get("recipe")
    if recipe == "list":
        print(f"{listing()}\n\nsweeps (one run per point: minimoe train --recipe SWEEP --plan):\n{sweep_listing()}")
        raise SystemExit(0)
    if recipe and not resume:  # the bottom layer: the TOML file and the flags still win
        try:
            r = get_recipe(recipe)
        except KeyError as e:
            p.error(f"recipe {recipe!r} is a sweep, one run per point: run it as minimoe train --recipe {recipe} "
                    "(not from a TOML file or with --resume)" if recipe in SWEEPS else e.args[0])
        given = set(train) | {k for k, v in args.items() if v is not None}
        train = {**r.train, **train, "recipe": recipe}
        if "steps" in given and "epochs" not in given:
            train["epochs"] = 0.0  # --steps given with a recipe that counts epochs: the steps win
        if (args.get("policy") or train["policy"]) == r.train["policy"]:  # (another --policy: not its options)
            options = {**options, r.train["policy"]: {**r.options, **options.get(r.train["policy"], {})}}
    for key, value in args.items():
        if value is None or key == "config":
            continue
        if "." in key:
            policy, opt = key.split(".", 1)
            options.setdefault(policy, {})[opt] = value
        else:
            train[key] = value
    policy = train.get("policy", TrainConfig.policy)
    if embedded and not resume:  # the embedded run: a shipped model, by default or named
        model = train.get("model") or EMBEDDED_MODELS.get(policy, "tiny-moe")
        if shipped_name(model):
            try:
                shipped(shipped_name(model))
            except FileNotFoundError as e:  # never a random preset in its place
                p.error(f"{'' if train.get('model') else 'the default base: '}{e}")
            train = {**EMBEDDED_RUN, **train, "model": model}
            options[policy] = {**EMBEDDED_OPTIONS.get(policy, {}), **options.get(policy, {})}
    if policy not in POLICIES:
        p.error(f"--policy {policy!r}: unknown; choose from {', '.join(POLICIES)}")
    foreign = [f"--{k}-*" for k in options if k != policy]
    if foreign:
        p.error(f"options {foreign} do not belong to --policy {policy}")
    fields = {f.name: f for f in dataclasses.fields(POLICIES[policy].Config)}
    bad = [k for k in options.get(policy, {}) if k not in fields]
    if bad:
        p.error(f"[{policy}] unknown option(s) {bad}; options: {list(fields)}")
    try:  # every value's type and range, before anything is loaded
        chosen = checked(POLICIES[policy].Config, options.get(policy, {}), f"[{policy}] ")
        train = checked(TrainConfig, train, "")
    except ValueError as e:
        source = f" (--config {args['config']} or the flags)" if args.get("config") else ""
        p.error(f"{e}{source}")
    config = TrainConfig(**train, policy_options=chosen)
    if resume:
        refuse_resume_changes(resume, config, run_args, run_options, p.error)
    return config


def refuse_resume_changes(run: str, config: TrainConfig, saved: dict, saved_options: dict, fail) -> None:
    """Refuse (``fail``) a resume whose flags change what it may not (``RESUME_MAY_CHANGE``), naming each."""
    asked = json.loads(json.dumps(dataclasses.asdict(config)))  # as saved: tuples are lists
    options = asked.pop("policy_options")
    changed = [f"--{k.replace('_', '-')} {asked[k]!r} (the run's: {saved[k]!r})" for k in asked
               if k in saved and k not in RESUME_MAY_CHANGE and k != "resume" and asked[k] != saved[k]]
    if config.policy == saved.get("policy"):  # (another policy is refused above; its options do not compare)
        # the options as the policy resolves them (the run saved those it was given; the rest are the defaults)
        cls = POLICIES[config.policy].Config
        theirs = json.loads(json.dumps(dataclasses.asdict(cls(**checked(cls, saved_options, "")))))
        mine = json.loads(json.dumps(dataclasses.asdict(cls(**options))))
        changed += [f"--{config.policy}-{k.replace('_', '-')} {v!r} (the run's: {theirs[k]!r})"
                    for k, v in mine.items() if v != theirs[k]]
    if changed:
        fail(f"--resume {run}: a resumed run cannot change {', '.join(changed)}: they make another run (its "
             f"data, base, adapters or order); start one with --out, or resume without them. A resume may change "
             f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)}")
