"""The papers' own settings, one name each: ``minimoe train --recipe NAME`` and ``minimoe eval --recipe NAME``.

    minimoe train --recipe list                       # every recipe, with the paper, table and row it reproduces
    minimoe train --recipe epng-olmoe-math            # model, data, steps, batch, lr, schedule, dtype, seed, options
    minimoe eval --recipe epng-olmoe-math --adapter runs/epng-olmoe-math/adapter   # the paper's evaluations

A recipe is the bottom layer of a run's arguments: a TOML file and flags given explicitly still win (e.g.
``--batch-size 4 --grad-accum 8`` keeps the effective batch on a smaller GPU). Its data and benchmarks come
from the Hub (``minimoe/sources.py``; cached, ``HF_HUB_OFFLINE=1`` honoured).

Where a paper leaves a setting out, the recipe says what it chose in ``notes``:
* EPnG (App. A.2/A.3): OLMoE-1B-7B-0125 and Qwen1.5-MoE-A2.7B; MetaMathQA (math) and Code Alpaca (code);
  500 steps, batch 32, lr 1e-4, AdamW, the transformers Trainer's defaults (linear decay, no warm-up), bf16
  mixed precision, rank 8, seed 0; GSM8K and MATH-algebra exact match, HumanEval/MBPP pass@10 with 10 samples
  at temperature 0.7. Not stated: the maximum length (512 here) and the generation length (512 tokens here).
* DMEP (§IV): Qwen3-0.6B and Qwen3-8B; ScienceQA (text-only), OpenBookQA and GSM8K (direct answer after
  ``####``); LoRA rank 8 (the parameter counts of its Table I imply it), E=8, top-2, all seven linears; 5 epochs,
  effective batch 128 (16 x 8 on 0.6B, 4 x 32 on 8B), cosine with 10% warm-up, max length 256, bf16, seed 42.
  Its peak learning rate did not survive our copy of the paper: 1e-4 here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..policies import POLICIES

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Hub data (OWNER/NAME:FILE or OWNER/NAME[:DIR]@SPLIT, see minimoe/sources.py)
DATA = {
    "math": "meta-math/MetaMathQA:MetaMathQA-395K.json",
    "code": "sahil2801/CodeAlpaca-20k:code_alpaca_20k.json",
    "scienceqa": "derek-thomas/ScienceQA@train",
    "openbookqa": "allenai/openbookqa:main@train",
    "gsm8k": "openai/gsm8k:main@train",
}


@dataclass(frozen=True)
class Evaluation:
    """One ``minimoe eval`` run of a recipe: a task on a Hub benchmark with its decoding flags."""

    task: str
    data: str
    flags: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return ["--task", self.task, "--data", self.data, *self.flags]


GSM8K = Evaluation("gsm8k", "openai/gsm8k:main@test", ("--max-new-tokens", "512"))
MATH = Evaluation("math", "EleutherAI/hendrycks_math:algebra@test", ("--max-new-tokens", "512"))
PASS10 = ("--num-samples", "10", "--temperature", "0.7", "--k", "1", "10", "--max-new-tokens", "512")
HUMANEVAL = Evaluation("humaneval", "openai/openai_humaneval@test", PASS10)
MBPP = Evaluation("mbpp", "google-research-datasets/mbpp:full@test", PASS10)
SCIENCEQA = Evaluation("mc", "derek-thomas/ScienceQA@test", ("--mc-mode", "letter"))
OPENBOOKQA = Evaluation("mc", "allenai/openbookqa:main@test", ("--mc-mode", "letter"))
GSM8K_DIRECT = Evaluation("gsm8k", "openai/gsm8k:main@test", ("--max-new-tokens", "32"))


@dataclass(frozen=True)
class Recipe:
    name: str
    paper: str  # paper, table and row
    reported: str  # the paper's numbers for that row
    train: dict  # TrainConfig keys
    options: dict = field(default_factory=dict)  # the policy's options
    evals: tuple[Evaluation, ...] = ()
    notes: str = ""  # what the recipe chose where the paper is silent
    # (memory per GPU: minimoe train --recipe NAME --plan, computed from the model's shape)


EPNG_MODELS = {"olmoe": ("allenai/OLMoE-1B-7B-0125", "Table 1 (OLMoE)"),
               "qwen1.5-moe": ("Qwen/Qwen1.5-MoE-A2.7B", "Table 2 (Qwen1.5-MoE)")}
# the paper's numbers, per (model, method): GSM8K, MATH, MBPP, HumanEval (Tables 1 and 2)
EPNG_REPORTED = {
    ("olmoe", "full"): (64.97, 24.68, 43.60, 25.00), ("olmoe", "esft"): (65.13, 22.49, 42.20, 24.39),
    ("olmoe", "lora"): (64.44, 21.90, 39.60, 22.56), ("olmoe", "epng"): (66.26, 21.40, 42.40, 23.78),
    ("qwen1.5-moe", "esft"): (64.14, 34.54, 60.40, 76.83), ("qwen1.5-moe", "lora"): (62.93, 34.96, 60.40, 70.12),
    ("qwen1.5-moe", "epng"): (64.22, 37.32, 60.00, 74.39),
}
EPNG_ROWS = {"epng": "EPnG (ours)", "lora": "LoRA (static)", "esft": "ESFT", "full": "FFT"}


def _epng(model: str, method: str, domain: str) -> Recipe:
    hub, table = EPNG_MODELS[model]
    gsm, math_, mbpp, he = EPNG_REPORTED[(model, method)]
    full = POLICIES[method].trains_base_weights  # trained base weights stay fp32 (no bf16 master copies)
    train = {"policy": method, "model": hub, "data": DATA[domain], "steps": 500, "batch_size": 8, "grad_accum": 4,
             "lr": 1e-4, "schedule": "linear", "warmup_ratio": 0.0, "max_len": 512, "seed": 0,
             "dtype": "float32" if full else "bfloat16", "gradient_checkpointing": True, "eval_limit": 0}
    reported = (f"GSM8K {gsm:.2f}, MATH {math_:.2f} (exact match %)" if domain == "math"
                else f"MBPP {mbpp:.2f}, HumanEval {he:.2f} (pass@10 %)")
    return Recipe(f"{method}-{model}-{domain}", f"EPnG {table}, row {EPNG_ROWS[method]}", reported, train,
                  evals=(GSM8K, MATH) if domain == "math" else (HUMANEVAL, MBPP),
                  notes="max length 512 and generation length 512 are not stated in the paper")


DMEP_REPORTED = {  # Table I: (params M, tok/s, accuracy %) per (model, task, method)
    ("0.6b", "scienceqa"): {"dense-lora": (5.0, 2620, 89.03), "lora-moe": (42.7, 1368, 91.32), "dmep": (24.2, 1466, 91.55)},
    ("0.6b", "openbookqa"): {"dense-lora": (5.0, 1753, 66.00), "lora-moe": (42.7, 923, 69.00), "dmep": (24.2, 1032, 69.00)},
    ("0.6b", "gsm8k"): {"dense-lora": (5.0, 2563, 13.00), "lora-moe": (42.7, 1354, 17.00), "dmep": (25.3, 1502, 19.00)},
    ("8b", "scienceqa"): {"dense-lora": (21.8, 526, 94.96), "lora-moe": (185.2, 294, 97.08), "dmep": (121.8, 320, 96.40)},
    ("8b", "openbookqa"): {"dense-lora": (21.8, 353, 93.00), "lora-moe": (185.2, 196, 95.00), "dmep": (107.9, 216, 95.00)},
    ("8b", "gsm8k"): {"dense-lora": (21.8, 517, 42.00), "lora-moe": (185.2, 288, 43.00), "dmep": (110.4, 317, 43.00)},
}
DMEP_ROWS = {"dense-lora": "Dense LoRA", "lora-moe": "Symmetric MoE", "dmep": "AEP/DMEP (ours)"}
DMEP_EVALS = {"scienceqa": SCIENCEQA, "openbookqa": OPENBOOKQA, "gsm8k": GSM8K_DIRECT}


def _dmep(size: str, method: str, task: str) -> Recipe:
    params, speed, acc = DMEP_REPORTED[(size, task)][method]
    batch, accum = (16, 8) if size == "0.6b" else (4, 32)
    train = {"policy": "lora" if method == "dense-lora" else "dmep", "model": f"Qwen/Qwen3-{size.upper()[:-1]}B",
             "data": DATA[task], "epochs": 5.0, "batch_size": batch, "grad_accum": accum, "lr": 1e-4,
             "schedule": "cosine", "warmup_ratio": 0.1, "max_len": 256, "seed": 42, "dtype": "bfloat16",
             "eval_limit": 0}
    options = ({"dense_targets": list(SEVEN)} if method == "dense-lora" else
               {"prune_step": -1} if method == "lora-moe" else {})
    if task == "gsm8k":
        train["answer_only"] = True  # DMEP: direct answer prediction after '####', no chain of thought
    return Recipe(f"{method}-qwen3-{size}-{task}", f"DMEP Table I, Qwen3-{size[:-1]}B / {task}, row {DMEP_ROWS[method]}",
                  f"{params:.1f}M trainable, {speed} tok/s, accuracy {acc:.2f}%", train, options, (DMEP_EVALS[task],),
                  notes="peak learning rate not in our copy of the paper (1e-4 chosen)")


def _all() -> dict[str, Recipe]:
    recipes = [_epng(m, method, d) for m in EPNG_MODELS for method in EPNG_ROWS for d in ("math", "code")
               if (m, method) in EPNG_REPORTED]
    recipes += [_dmep(s, method, t) for s in ("0.6b", "8b") for t in DMEP_EVALS for method in DMEP_ROWS]
    return {r.name: r for r in recipes}


RECIPES = _all()


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"--recipe {name!r}: unknown; minimoe train --recipe list shows them")
    return RECIPES[name]


def listing() -> str:
    """``--recipe list``: each recipe with what it reproduces and the paper's numbers."""
    width = max(map(len, RECIPES))
    return "\n".join(f"{r.name:<{width}}  {r.paper}: {r.reported}" for r in RECIPES.values())
