"""EPnG Table 4 (App. C.1): general ability after fine-tuning — ARC-Challenge, ARC-Easy and BoolQ, zero-shot,
accuracy — for a base model and its fine-tunes, through lm-evaluation-harness (``harness.py``), as one table.

    minimoe eval --recipe epng-general --adapter runs/epng/adapter runs/lora/adapter --merged runs/full/export

Each row is one lm_eval evaluation with the minimoe backend: the base (``--model``, default the base the first
adapter records), each adapter loaded onto it unmerged, each merged checkpoint (full fine-tuning's export).
The paper's table is printed beside ours; the paper does not say which backbone, domain or lm_eval metric
(``acc`` or ``acc_norm``) its Table 4 used, nor the shots: this recipe takes lm_eval's ``acc``, zero-shot,
and says so. ``--tasks``/``--include-path`` score other (or local) task files the same way. Writes
``OUT/general.md`` (the table) and ``OUT/general.json`` (every row's lm_eval results).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS = ("arc_challenge", "arc_easy", "boolq")
METRIC = "acc,none"
PAPER = {"Base": (50.17, 69.30, 66.54), "FFT": (48.16, 63.51, 65.75), "LoRA": (50.17, 68.42, 65.23),
         "EPnG": (50.17, 69.12, 65.75)}  # EPnG Table 4 (backbone not stated), accuracy %


def parse_args(argv):
    p = argparse.ArgumentParser(prog="minimoe eval --recipe epng-general", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the base (default: the base the first --adapter records)")
    p.add_argument("--adapter", nargs="*", default=[], help="minimoe adapter directories: a row each, unmerged")
    p.add_argument("--merged", nargs="*", default=[], help="merged checkpoints (full fine-tuning's export): a row each")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"lm_eval tasks (default: {' '.join(TASKS)})")
    p.add_argument("--include-path", help="a directory of lm_eval task files (e.g. local copies of the tasks)")
    p.add_argument("--limit", type=int, help="documents per task (lm_eval --limit)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: a GPU if any)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", type=Path, default=Path("runs/eval/epng-general"))
    args = p.parse_args(argv)
    if not (args.model or args.adapter):
        p.error("give --model, or an --adapter whose recorded base is scored as the base row")
    return args


def _label(path: str) -> str:
    """A row's name: the run directory's for RUN/adapter or RUN/export, else the directory's own."""
    p = Path(path)
    return p.parent.name if p.name in ("adapter", "export", "merged") else p.name


def rows(args) -> list[tuple[str, str]]:
    """``[(label, model_args)]``: the base, then each adapter and merged checkpoint."""
    from ..adapters.io import adapter_base_model

    base = args.model or adapter_base_model(args.adapter[0])
    common = f"dtype={args.dtype}" + (f",device={args.device}" if args.device else "")
    out = [("base", f"pretrained={base},{common}")]
    out += [(_label(a), f"pretrained={base},adapter={a},{common}") for a in args.adapter]
    out += [(_label(m), f"pretrained={m},{common}") for m in args.merged]
    return out


def table(scores: dict[str, dict[str, float]], tasks: list[str]) -> str:
    """Our rows (accuracy %), then the paper's Table 4 when the tasks are its three."""
    lines = [f"| model | {' | '.join(tasks)} |", "|---|" + "---:|" * len(tasks)]
    lines += [f"| {name} | " + " | ".join(f"{row[t]:.2f}" for t in tasks) + " |" for name, row in scores.items()]
    if tuple(tasks) == TASKS:
        lines += ["", "EPnG Table 4 (the paper; backbone, metric and shots not stated):", "",
                  "| model | ARC-C | ARC-E | BoolQ |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for name, row in PAPER.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    from ..utils.files import write_text_atomic
    from . import harness

    if harness.MISSING:
        print(harness.MISSING, file=sys.stderr)
        return 2
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = parse_args(sys.argv[1:] if argv is None else argv)
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    scores, results = {}, {}
    for name, model_args in rows(args):
        print(f"epng-general: {name}: lm_eval --model minimoe --model_args {model_args} --tasks "
              f"{','.join(args.tasks)} --num_fewshot 0", flush=True)
        r = lm_eval.simple_evaluate(model="minimoe", model_args=model_args, tasks=list(args.tasks), num_fewshot=0,
                                    task_manager=manager, batch_size=args.batch_size, limit=args.limit)
        scores[name] = {t: 100 * r["results"][t][METRIC] for t in args.tasks}
        results[name] = {"model_args": model_args, "results": r["results"]}
    text = table(scores, list(args.tasks))
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "general.md", text + "\n")
    write_text_atomic(args.out / "general.json", json.dumps(results, indent=1, default=str))
    print(f"\n-> {args.out / 'general.md'}")
    return 0
