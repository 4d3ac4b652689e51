"""``--recipe``: the papers' settings by name, each one run on a tiny preset with its Hub data laid out as the Hub
cache (offline), its evaluations through ``eval.py --recipe``, and the data forms the DMEP recipes need."""

import json
import math
import re
from pathlib import Path

import pytest
from test_eval_formats import OBQA_HUB, SCIENCEQA_HINT, SCIENCEQA_IMAGE, SCIENCEQA_TEXT
from test_sources import CODE_ALPACA, GSM8K, METAMATHQA, _jsonl, hub  # noqa: F401  (hub: the fixture)

from minimoe.data.mc_rows import mc_prompt, mc_row
from minimoe.train.config import resolve
from minimoe.data.dataset import DataError, answer_only, read_pairs
from minimoe.train.sweeps import SWEEPS
from minimoe.train.recipes import RECIPES, SEVEN

from minimoe.cli import eval as eval_py  # noqa: E402
from minimoe.cli import train as train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {"allenai/OLMoE-1B-7B-0125": "tiny-olmoe", "Qwen/Qwen1.5-MoE-A2.7B": "tiny-qwen2-moe",
        "Qwen/Qwen3-0.6B": "tiny-qwen3", "Qwen/Qwen3-8B": "tiny-qwen3"}


def _hub_data(hub):  # noqa: F811
    """Every dataset the recipes train on, where their specs point, in the Hub's own forms."""
    hub("meta-math/MetaMathQA", {"MetaMathQA-395K.json": json.dumps(METAMATHQA).encode()})
    hub("sahil2801/CodeAlpaca-20k", {"code_alpaca_20k.json": json.dumps(CODE_ALPACA).encode()})
    hub("openai/gsm8k", {"main/train-00000-of-00001.jsonl": _jsonl(GSM8K), "main/test-00000-of-00001.jsonl": _jsonl(GSM8K)})
    hub("allenai/openbookqa", {"main/train-00000-of-00001.jsonl": _jsonl([OBQA_HUB] * 3),
                               "main/test-00000-of-00001.jsonl": _jsonl([OBQA_HUB] * 3)})
    hub("derek-thomas/ScienceQA", {"data/train-00000-of-00001.jsonl": _jsonl([SCIENCEQA_TEXT, SCIENCEQA_IMAGE,
                                                                               SCIENCEQA_HINT])})


def test_the_list_names_every_recipe_with_its_paper_and_row(capsys):
    with pytest.raises(SystemExit) as done:
        train.main(["--recipe", "list"])
    assert done.value.code == 0
    text, sweeps = capsys.readouterr().out.split("\n\nsweeps (one run per point")
    assert len(text.splitlines()) == len(RECIPES) == 14 + 18  # EPnG Tables 1-2 (FFT on OLMoE only), DMEP Table I
    assert [line.split()[0] for line in sweeps.splitlines()[1:]] == list(SWEEPS)
    assert "epng-olmoe-math" in text and "EPnG Table 1 (OLMoE), row EPnG (ours): GSM8K 66.26, MATH 21.40" in text
    assert "dmep-qwen3-8b-openbookqa" in text and "107.9M trainable, 216 tok/s, accuracy 95.00%" in text


def test_a_recipe_sets_what_the_paper_reports_and_flags_still_win():
    c = resolve(["--recipe", "epng-olmoe-math"])
    assert (c.policy, c.model, c.data) == ("epng", "allenai/OLMoE-1B-7B-0125", "meta-math/MetaMathQA:MetaMathQA-395K.json")
    assert (c.steps, c.batch_size * c.grad_accum, c.lr, c.schedule, c.warmup_ratio) == (500, 32, 1e-4, "linear", 0.0)
    assert (c.dtype, c.seed, c.recipe) == ("bfloat16", 0, "epng-olmoe-math")
    assert resolve(["--recipe", "full-olmoe-code"]).dtype == "float32"  # trained base weights keep fp32
    d = resolve(["--recipe", "dmep-qwen3-0.6b-scienceqa"])
    assert (d.model, d.epochs, d.batch_size * d.grad_accum, d.schedule, d.warmup_ratio) == (
        "Qwen/Qwen3-0.6B", 5.0, 128, "cosine", 0.1)
    assert (d.max_len, d.seed, d.policy_options) == (256, 42, {})
    assert resolve(["--recipe", "dmep-qwen3-8b-gsm8k"]).batch_size == 4 and \
        resolve(["--recipe", "dmep-qwen3-8b-gsm8k"]).answer_only
    assert resolve(["--recipe", "lora-moe-qwen3-8b-gsm8k"]).policy_options == {"prune_step": -1}
    assert resolve(["--recipe", "dense-lora-qwen3-0.6b-gsm8k"]).policy_options == {"dense_targets": SEVEN}
    mine = resolve(["--recipe", "dmep-qwen3-0.6b-scienceqa", "--batch-size", "4", "--grad-accum", "32",
                    "--dmep-tau", "0.2", "--steps", "7"])
    assert (mine.batch_size, mine.grad_accum, mine.policy_options, mine.steps, mine.epochs) == (
        4, 32, {"tau": 0.2}, 7, 0.0)  # --steps given: the recipe's epochs give way


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_runs_on_a_tiny_preset_with_its_hub_data(hub, tmp_path, name):  # noqa: F811
    _hub_data(hub)
    recipe = RECIPES[name]
    out = tmp_path / "run"
    # (quick: fewer probe/scoring batches, and fp32: bf16 matmuls on CPU cost ~0.1 s each whatever their size)
    quick = {"epng": ["--epng-probe-batches", "1"], "esft": ["--esft-sample-batches", "1"]}.get(recipe.train["policy"], [])
    quick += ["--dtype", "float32"]
    assert train.main(["--recipe", name, "--model", TINY[recipe.train["model"]], "--steps", "1", "--batch-size", "2",
                       "--grad-accum", "1", "--max-len", "64", *quick, "--out", str(out)]) == 0
    args = json.loads((out / "args.json").read_text())
    assert (args["recipe"], args["data"], args["seed"], args["schedule"]) == (
        name, recipe.train["data"], recipe.train["seed"], recipe.train["schedule"])
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_dmep_recipes_count_their_steps_in_epochs(hub, tmp_path, capsys):  # noqa: F811
    _hub_data(hub)
    out = tmp_path / "run"
    assert train.main(["--recipe", "dmep-qwen3-0.6b-openbookqa", "--model", "tiny-qwen3", "--batch-size", "1", "--dtype", "float32",
                       "--grad-accum", "1", "--max-len", "64", "--out", str(out)]) == 0
    assert json.loads((out / "args.json").read_text())["steps"] == math.ceil(5 * 3 / 1) == 15  # 5 epochs of 3 rows
    said = capsys.readouterr().out
    assert "--epochs 5: 15 steps (3 examples, global batch 1)" in said
    assert "recipe dmep-qwen3-0.6b-openbookqa: DMEP Table I" in said and "peak learning rate not in our copy" in said


def test_multiple_choice_rows_train_as_their_letter_and_image_rows_are_left_out(hub, tmp_path):  # noqa: F811
    _hub_data(hub)
    pairs = read_pairs("derek-thomas/ScienceQA@train")
    assert len(pairs) == 2  # the row with an image is left out
    assert pairs[0] == (mc_prompt(mc_row(SCIENCEQA_TEXT)), "ABC"[mc_row(SCIENCEQA_TEXT)["answer"]])
    prompt, letter = read_pairs("allenai/openbookqa:main@train")[0]
    assert prompt.startswith("The sun is responsible for\nA. ") and prompt.endswith("letter of the correct option.")
    assert letter == "ABCD"[mc_row(OBQA_HUB)["answer"]]


def test_answer_only_keeps_the_final_answer():
    assert answer_only([("q", GSM8K[0]["answer"]), ("p", "so 3 + 4 = 7\n#### 7 ")], "g.jsonl") == [
        ("q", "#### 72"), ("p", "#### 7")]
    with pytest.raises(DataError, match=r"^g.jsonl: example 1: --answer-only needs a final answer after '####'"):
        answer_only([("q", "no marker")], "g.jsonl")


def test_eval_recipe_runs_each_evaluation_of_the_row(hub, tmp_path, capsys):  # noqa: F811
    _hub_data(hub)
    out = tmp_path / "ev"
    assert eval_py.main(["--recipe", "dmep-qwen3-0.6b-openbookqa", "--model", "tiny-dense",
                         "--limit", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "openbookqa-mc" / "summary.json").read_text())
    assert summary["task"] == "mc" and summary["problems"] == 2 and summary["decoding"]["max_new_tokens"] == 256
    assert eval_py.main(["--recipe", "nope"]) == 2 and "unknown" in capsys.readouterr().err


@pytest.mark.parametrize("name,trainable", [
    ("epng-olmoe-math", 50_331_648),  # EPnG: 0.72% of OLMoE's 6.92B
    ("dense-lora-qwen3-0.6b-gsm8k", 5_046_272),  # DMEP Table I: 5.0M
    ("lora-moe-qwen3-0.6b-gsm8k", 42_663_936),  # 42.7M
    ("lora-moe-qwen3-8b-openbookqa", 185_204_736),  # 185.2M
])
def test_a_recipes_plan_has_the_papers_trainable_count(name, trainable, capsys):
    assert train.main(["--recipe", name, "--plan", "--device", "cuda"]) in (0, 1)  # (1: does not fit this machine)
    assert re.search(rf"trainable parameters +{trainable:,}\n", capsys.readouterr().out)
