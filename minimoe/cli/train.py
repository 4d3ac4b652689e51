"""Fine-tune an MoE (or dense) model with one of the papers' methods or baselines (``minimoe train``;
``python train.py`` in a clone of the repository is the same command).

    minimoe train --policy epng                                  # the shipped tiny-moe on tiny-arith, offline
    minimoe train --policy dmep --steps 300 --dmep-tau 0.15
    minimoe train --policy epng --model allenai/OLMoE-1B-7B-0125 --data metamath.jsonl --batch-size 32
    minimoe train --policy epng --config run.toml                # TOML: [train] keys and [epng] options
    minimoe train --policy epng --resume runs/epng --steps 1000  # continue a run
    minimoe train --policy epng --model allenai/OLMoE-1B-7B-0125 --batch-size 8 --plan   # will it fit?

Policies: lora (static LoRA), epng (expert prune-and-grow), dmep (module-wise expert pruning),
esft (expert-specialised full fine-tuning), full (full fine-tuning). Every policy option defaults to
its paper's value and is printed at start; flags are --<policy>-<option>.
"""

from __future__ import annotations

import sys
import traceback

from ..data.builtin import is_builtin
from ..parallel.distributed import exit_with_error, lost_peer
from ..parallel.watchdog import lost_peers_message
from ..train.config import TrainConfig, build_parser, resolve as resolve_config
from ..train.run_dir import RunDir, RunDirError
from ..train.trainer import Trainer, TrainingError


def resolve(argv=None) -> TrainConfig:
    """The run's TrainConfig: defaults < embedded-model scaling (no --model given) < TOML < command line."""
    return resolve_config(argv, description=__doc__)


def task_score(trainer: Trainer, limit: int) -> float:
    """Greedy exact match on the first ``limit`` problems of the test split of the built-in task trained on."""
    from ..data.builtin import ANSWER_TOKENS, builtin_split
    from ..eval.runners import Decoding, generate_all, grade, task_prompt

    task = trainer.config.data
    rows = [{"question": q, "answer": a} for q, a in builtin_split(task, "test")[:limit]]
    prompts = [task_prompt(task, r, trainer.tok) for r in rows]
    decoding = Decoding(max_new_tokens=ANSWER_TOKENS[task], batch_size=50)
    completions = generate_all(trainer.model.eval(), trainer.tok, prompts, decoding, progress=False)
    return grade(task, rows, completions)[0]["exact_match"]


def _recipe(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from ..train.sweeps import SWEEPS

    if _recipe(argv) in SWEEPS:  # an analysis: one run per point (minimoe/cli/sweep.py)
        from .sweep import main as sweep

        return sweep(argv)
    flags = build_parser(__doc__).parse_args(argv)
    if flags.plan:  # the run's memory plan instead of the run (see minimoe plan)
        from ..tools.plan import plan_for

        return plan_for(resolve(argv), flags.gpu_memory, flags.json)
    if flags.gpu_memory is not None or flags.json:
        return exit_with_error("--gpu-memory and --json go with --plan", 2)
    config = resolve(argv)
    if config.resume and (done := RunDir(config.resume).finished(config.steps)):
        return exit_with_error(done, 2)  # summary.json and everything else untouched
    try:
        trainer = Trainer(config).setup()
    except (TrainingError, RunDirError, ValueError, FileNotFoundError) as e:
        return exit_with_error(str(e), 2)
    c, world = trainer.config, trainer.world
    say = world.print  # one process speaks
    if c.recipe:  # what it reproduces, and what it chose where the paper is silent
        from ..train.recipes import get_recipe

        recipe = get_recipe(c.recipe)
        say(f"recipe {recipe.name}: {recipe.paper} (the paper: {recipe.reported}); {recipe.notes}")
    say(f"{trainer.policy.describe()}")
    batch = (f"{c.batch_size} x {c.grad_accum} accumulation x {world.size} processes = {trainer.global_batch} "
             f"sequences (--dist-timeout {c.dist_timeout:g} s)" if world.distributed
             else f"{c.batch_size * c.grad_accum} sequences")
    say(f"model {c.model} ({trainer.model.config.model_type}, {trainer.model.num_parameters():,} parameters) | "
        f"data {c.data} ({len(trainer.data)} examples, {trainer.steps_per_epoch} steps/epoch) | "
        f"{c.steps} steps x {batch}, lr {c.lr}, {trainer.device} | "
        f"run {trainer.run}" + (f" (resumed at step {trainer.step})" if c.resume else ""))
    if trainer.model.num_adapter_parameters():
        say(trainer.model.adapter_summary())
    else:
        say(f"trainable: {trainer.model.num_parameters(trainable_only=True):,} parameters ({c.policy})")
    # scored by the first process only; with --fsdp by all (each forward gathers the base from all of them)
    score = is_builtin(c.data) and c.eval_limit > 0 and (world.main or c.fsdp)
    before = task_score(trainer, c.eval_limit) if score and not c.resume else None
    if before is not None:
        say(f"{c.data} test exact match before fine-tuning: {before:.3f} ({c.eval_limit} problems, greedy)")
    try:
        summary = trainer.train()
    except (TrainingError, RunDirError) as e:
        return exit_with_error(str(e), 1)
    except Exception as e:  # any other failure: with several processes, this one must still leave at once
        if not world.distributed:
            raise
        if lost_peer(e):
            return exit_with_error(lost_peers_message(), 1, lost_peer=True)
        traceback.print_exc()
        return exit_with_error(f"{type(e).__name__}: {e}", 1)
    if score and not summary.get("interrupted"):
        after = task_score(trainer, c.eval_limit)
        if world.main:
            summary = trainer.run.update_summary(task_score_before=before, task_score_after=after)
        say(f"{c.data} test exact match: {'' if before is None else f'{before:.3f} -> '}{after:.3f}")
    if summary.get("events") and trainer.model.num_adapter_parameters():
        say("after training:\n" + trainer.model.adapter_summary())
    if summary.get("interrupted"):  # checkpointed on request: 75 preempted (resume it), 130 Ctrl-C (stopping.py)
        return world.finish(summary["exit_code"])
    tps = summary["tokens_per_s"]
    say(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
        f"{summary['trainable_parameters']:,} trainable parameters, "
        f"{f'{tps:,.0f} tokens/s' if tps else 'no new steps'}"
        f"{f' over {world.size} processes' if world.distributed else ''}, {summary['events']} events -> {trainer.run}")
    return world.finish(0)  # several processes: the others waited for the first's scoring


if __name__ == "__main__":
    sys.exit(main())
