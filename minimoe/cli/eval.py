"""Score a base model, a model + adapter, or a merged export, the way the papers do (``minimoe eval``;
``python eval.py`` in a clone of the repository is the same command).

    minimoe eval --adapter runs/epng/adapter --task tiny-arith   # base model read from the adapter
    minimoe eval --model weights/olmoe-math --task gsm8k --data gsm8k_test.jsonl --limit 200
    minimoe eval --model Qwen/Qwen1.5-MoE-A2.7B --task humaneval --data HumanEval.jsonl --n 10 \\
        --temperature 0.7 --k 1 10
    minimoe eval --task humaneval --data HumanEval.jsonl --completions other_tool_samples.jsonl   # no model
    minimoe eval --harness --model minimoe --model_args adapter=runs/dmep/adapter --tasks arc_easy  # lm_eval's

The tasks (listed below) are the objects of minimoe.eval.tasks' registry: this command asks the chosen one
for its rows, prompts, grader, metric and way of scoring (generation, option log-likelihood, perplexity),
and adds its own options (mc: --mc-mode loglik|letter; math: --math-grader). Code tasks run programs in a
sandboxed subprocess (--sandbox process|bwrap). Writes OUT/summary.json (scores, decoding settings, the
sandbox or MATH grader, skipped rows) and OUT/samples.jsonl (one line per sample, with its prompt and
reference). While it runs, OUT.partial/ keeps the completions and every graded problem: if the evaluation is
killed, the same command resumes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from ..data.sources import hub_parts, resolve
from ..parallel.distributed import World, exit_with_error
from ..utils.files import DestinationExists, Unwritable, atomic_dir, check_destination, check_writable
from ..eval.progress import Progress, partial_dir
from ..eval.runners import Decoding, grade, read_rows, run_task, task_rows, write_results
from ..eval.sandbox import SANDBOXES, check_sandbox
from ..eval.tasks import GENERATE, TASKS, Task, get_task


def task_list() -> str:
    """The end of --help: each registered task with its one-line description."""
    width = max(map(len, TASKS))
    return "tasks:\n" + "\n".join(f"  {name:<{width}}  {task.description}" for name, task in TASKS.items())


def build_parser() -> argparse.ArgumentParser:
    """The command line; --task's choices, the task list and the tasks' own options come from the registry
    (built at each call, so a task registered after import is offered too)."""
    p = argparse.ArgumentParser(prog="minimoe eval", description=__doc__, epilog=task_list(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hub id or checkpoint directory (base model or merged export); "
                   "with --adapter, defaults to the base the adapter records")
    p.add_argument("--adapter", help="a minimoe adapter directory to load onto --model")
    p.add_argument("--no-check-base", action="store_true",
                   help="load --adapter even if --model is not the base it was saved on")
    p.add_argument("--recipe", help="run the evaluations of a paper's recipe (minimoe train --recipe list) instead "
                   "of one --task; the other flags apply to each")
    p.add_argument("--task", required=True, choices=list(TASKS), help="the benchmark (tasks: below)")
    p.add_argument("--data", help="the task's data: a JSON, JSONL, .jsonl.gz or Parquet file, or a Hub dataset "
                   "(hf://datasets/OWNER/NAME/FILE, OWNER/NAME:FILE, OWNER/NAME[:DIR]@SPLIT); a text file for perplexity")
    p.add_argument("--data-filter", nargs="+", default=[], metavar="KEY=VALUE",
                   help="score only the problems whose field KEY equals VALUE (e.g. type=Algebra for MATH-algebra)")
    p.add_argument("--limit", type=int, help="score only the first N problems")
    p.add_argument("--out", type=Path, help="output directory (default runs/eval/<what>/<task>, <what> the run "
                   "of --adapter, else the --model or --completions name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory (and start over "
                   "where OUT.partial holds the progress of a different evaluation)")
    p.add_argument("--completions", type=Path, help="score these completions (JSONL: task_id or index, and "
                   "completion or completions) instead of generating; no model is loaded")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=1,
                   help="samples per problem (default 1; under torchrun write --num-samples: torchrun reads --n as "
                        "its own --nnodes)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 10], help="pass@k values (default 1 10; those <= n)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length limit (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch, or questions per "
                   "log-likelihood batch (--mc-mode loglik: their options are scored together) (default 8)")
    for task in TASKS.values():
        task.add_arguments(p)  # mc: --mc-mode
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per generated program (default 10)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program (default 1024)")
    p.add_argument("--sandbox", choices=SANDBOXES, default="process",
                   help="how generated programs are isolated: process (default; a supervised process tree, confined "
                        "by Landlock where the kernel has it) or bwrap (also in bubblewrap's namespaces: no network, "
                        "read-only root; needs the bwrap command). See docs/evaluation.md")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p


def load_completions(path: Path, rows: list[dict]) -> list[list[str]]:
    """Completions from another tool, matched to problems by task_id (else by index, else in order)."""
    by_key: dict = {}
    for n, rec in enumerate(read_rows(path)):
        key = next((rec[k] for k in ("task_id", "index") if rec.get(k) is not None), n)
        texts = rec["completions"] if "completions" in rec else [rec.get("completion", "")]
        by_key.setdefault(key, []).extend(texts)
    out = []
    for i, row in enumerate(rows):
        key = row.get("task_id", i)
        if key not in by_key:
            raise ValueError(f"{path}: no completion for problem {key!r}")
        out.append(by_key[key])
    return out


def default_out(args) -> Path:
    """runs/eval/<what>/<task>: one directory per thing evaluated, so scoring an adapter and then its merged
    export (or two runs) never collide. An adapter saved as RUN/adapter is named after RUN."""
    if args.completions:
        what = Path(args.completions).stem
    elif args.adapter:
        a = Path(args.adapter).resolve()
        what = a.parent.name if a.name == "adapter" else a.name
    else:
        what = Path(str(args.model)).name if Path(str(args.model)).is_dir() else str(args.model).replace("/", "--")
    return Path("runs/eval") / (what or "model") / args.task


def evaluation(args) -> dict:
    """What an evaluation is, for resuming it: the arguments that change its results, and the digests of the
    files it reads (a rerun resumes ``OUT.partial`` only if all are the same)."""
    run = {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())
           if k not in ("out", "overwrite", "device")}
    for name in ("data", "completions"):
        if run.get(name) and Path(run[name]).is_file():
            run[f"{name}_sha256"] = hashlib.sha256(Path(run[name]).read_bytes()).hexdigest()
        elif name == "data" and run.get(name) and hub_parts(run[name]):  # the Hub files, as cached
            digest = hashlib.sha256()
            for _, path in resolve(run[name]):
                digest.update(path.read_bytes())
            run["data_sha256"] = digest.hexdigest()
    return run


def unwritable(directory: Path) -> str | None:
    """Why no file can be written in ``directory`` (one line naming it), or None."""
    try:
        check_writable(directory)
    except Unwritable as e:
        return str(e)
    return None


def run_recipe(name: str, argv: list[str]) -> int:
    """``--recipe NAME``: every evaluation the recipe's paper reports for its row, one after the other, each
    into its own directory (``--out DIR``: DIR/<task>; else the default per task); the other flags apply to
    each (e.g. ``--adapter``, ``--limit``). Stops at the first that fails."""
    from ..train.recipes import get_recipe, listing

    if name == "list":
        print(listing() + "\nepng-general  EPnG Table 4: ARC-C, ARC-E, BoolQ after fine-tuning (lm_eval; "
              "minimoe eval --recipe epng-general --help)")
        return 0
    if name == "epng-general":  # through lm-evaluation-harness (eval/general.py)
        from ..eval.general import main as general

        return general(argv)
    try:
        recipe = get_recipe(name)
    except KeyError as e:
        return exit_with_error(e.args[0], 2)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--out", type=Path)
    known, rest = pre.parse_known_args(argv)
    for ev in recipe.evals:
        out = ["--out", str(known.out / (Path(ev.data.split("@")[0].split(":")[0]).name + "-" + ev.task))] if known.out else []
        print(f"{recipe.name}: minimoe eval {' '.join(ev.argv())}", flush=True)
        if rc := main([*ev.argv(), *rest, *out]):
            return rc
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--harness"]:  # lm-evaluation-harness's command line, the minimoe backend registered
        from ..eval.harness import main as harness

        return harness(argv[1:])
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    known, rest = pre.parse_known_args(argv)
    if known.recipe:
        return run_recipe(known.recipe, rest)
    args = build_parser().parse_args(argv)
    out = args.out or default_out(args)
    try:  # before the evaluation: an existing or unwritable destination, or a missing sandbox, costs nothing
        check_destination(out, args.overwrite, flag="--overwrite (or --out DIR)")
        check_sandbox(args.sandbox)
    except (FileExistsError, ValueError) as e:
        return exit_with_error(str(e), 2)
    world = World.from_env(args.device or "")  # torchrun: the problems are shared out over the processes
    if error := world.gather(unwritable(out.parent) if world.main else None)[0]:  # one probe, every process told
        return exit_with_error(error, 2)
    dec = Decoding(args.max_new_tokens, args.n, args.temperature, args.top_p, args.batch_size, args.seed)
    try:
        task = get_task(args.task).configure(argparse.Namespace(**{**vars(args), "out": out}))  # files near OUT
        rows = task_rows(task, args.data, args.limit, args.data_filter)
        if args.completions:
            task.check_completions()
        progress = None
        if task.scoring == GENERATE:  # completions and graded problems are kept as they come (OUT.partial)
            run = evaluation(args)
            if "grader" in (info := task.grading_info()):  # MATH: resumed only by the grader that began it
                run["grader"] = info["grader"]
            progress = Progress.open(partial_dir(out), run, world, restart=args.overwrite)
        if args.completions:
            summary, records = grade(task, rows, load_completions(args.completions, rows), args.k,
                                     args.timeout, args.memory_mb, world=world, progress=progress)
            summary.update(task=args.task, completions=str(args.completions))
            dec = None
        else:
            summary, records = run_model(args, task, rows, dec, world, progress)
        if world.main:  # every process holds the whole result; one writes it
            write_output(out, args.overwrite, summary, records, dec, progress)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, Unwritable) as e:
        return exit_with_error(str(e), 2)
    if world.main:
        print(json.dumps({k: v for k, v in summary.items() if k != "decoding"}))
        print(f"wrote {out}/summary.json and {out}/samples.jsonl")
    return world.finish(0)


def write_output(out: Path, overwrite: bool, summary: dict, records: list[dict], dec, progress) -> None:
    """OUT/summary.json and OUT/samples.jsonl, written together (atomically); then OUT.partial goes. A failed
    write (a full disk, a read-only directory) is one line naming OUT; the graded problems stay in OUT.partial
    and the same command writes them without grading again."""
    try:
        with atomic_dir(out, overwrite, flag="--overwrite") as tmp:
            write_results(tmp, summary, records, dec)
    except DestinationExists:
        raise
    except OSError as e:
        kept = f"; the graded problems are kept in {progress.path}: rerun the command to write them" if progress else ""
        raise Unwritable(f"cannot write {out}: {e.strerror or e}{kept}") from None
    if progress:
        progress.remove()


def run_model(args, task: Task, rows, dec: Decoding, world: World = World(),
              progress: Progress | None = None) -> tuple[dict, list[dict]]:
    """Load --model (and --adapter) and score it on the task the way the task is scored."""
    import torch

    import minimoe

    if not args.model and args.adapter:
        from ..adapters.io import adapter_base_model

        args.model = adapter_base_model(args.adapter)
    if not args.model:
        raise ValueError("--model is required unless --completions or --adapter is given")
    device = world.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = minimoe.from_pretrained(args.model, device=device)
    if args.adapter:
        model.load_adapter(args.adapter, check_base=not args.no_check_base)
    model.eval()
    tok = minimoe.load_tokenizer(args.model)
    summary, records = run_task(task, model, tok, rows, dec, args.k, args.timeout, args.memory_mb, world=world,
                                progress=progress)
    summary.update(task=args.task, model=args.model, adapter=args.adapter, data=args.data)
    return summary, records


if __name__ == "__main__":
    sys.exit(main())
