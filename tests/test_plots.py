"""minimoe plots on real run directories, and its message when matplotlib is missing."""

import json
import sys
from pathlib import Path

import pytest

from minimoe.tools.plots import main
from minimoe.cli import train as train

PNG = b"\x89PNG\r\n\x1a\n"


def _written(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run / "plots").iterdir()}


@pytest.mark.slow
def test_plots_of_epng_and_dmep_runs(tmp_path):
    assert train.main(["--policy", "epng", "--model", "tiny-olmoe", "--steps", "6", "--batch-size", "4", "--eval-limit", "0",
                       "--epng-warmup", "2", "--epng-interval", "2", "--epng-probe-batches", "2",
                       "--out", str(tmp_path / "e")]) == 0
    assert main([str(tmp_path / "e")]) == 0
    files = _written(tmp_path / "e")
    figures = {"loss.png", "epng_importance.png", "epng_ranks.png", "epng_prune_grow.png", "epng_importance_shift.png"}
    assert set(files) == figures | {"index.md"}
    assert all(files[f].startswith(PNG) and len(files[f]) > 5000 for f in figures)  # a drawn figure, not a blank
    index = files["index.md"].decode()
    assert all(f"]({f})" in index for f in figures) and "| policy | epng |" in index

    assert train.main(["--policy", "dmep", "--model", "tiny-qwen3", "--eval-limit", "0", "--steps", "4",
                       "--batch-size", "2", "--dmep-prune-step", "2",
                       "--dmep-log-interval", "1", "--out", str(tmp_path / "d")]) == 0
    assert main([str(tmp_path / "d")]) == 0
    files = _written(tmp_path / "d")
    figures = {"loss.png", "dmep_survivors.png", "dmep_gini.png", "dmep_routing.png"}
    assert set(files) == figures | {"index.md"}
    assert all(files[f].startswith(PNG) and len(files[f]) > 5000 for f in figures)
    assert "| policy | dmep |" in files["index.md"].decode()
    from minimoe.tools.reproduce import figures  # what minimoe reproduce appends to its table.md

    links = figures(tmp_path, [tmp_path / "e", tmp_path / "d"])
    assert "[epng_prune_grow](e/plots/epng_prune_grow.png)" in links and "[dmep_routing](d/plots/dmep_routing.png)" in links
    assert "(d/plots/index.md)" in links


def test_without_matplotlib_the_command_says_how_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([str(tmp_path)]) == 2
    assert "pip install 'minimoe[plot]'" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2


def test_reproduce_table_reports_mean_and_std():
    from minimoe.tools.reproduce import table

    def runs(scores, trainable=(12288,), speed=1000.0, late=None):
        return [{"task_score_after": s, "task_score_before": 0.1, "trainable_parameters": n, "tokens_per_s": speed,
                 "tokens_per_s_late": late} for s, n in zip(scores, trainable * len(scores))]

    text = table({"lora": runs((0.2, 0.4)), "epng": runs((0.5,), speed=900.0),
                  "lora-moe": runs((0.9, 0.9), (3000,), 400.0, 450.0),
                  "dmep": [*runs((1.0,), (3000,), 500.0, 700.0), *runs((1.0,), (2500,), 500.0, 500.0)]})
    epng, dmep = text.split("**DMEP")
    assert "| lora | 12,288 | 1,000 | 0.300 ± 0.141 | 2 |" in epng
    assert "| epng | 12,288 | 900 | 0.500 ± 0.000 | 1 |" in epng and "before fine-tuning: 0.100" in epng
    assert "tokens/s, 2nd half" in dmep and "2nd half" not in epng
    assert "| dmep | 2,500–3,000 | 500 | 600 | 1.000 ± 0.000 | 2 |" in dmep  # survivors differ by seed
    assert "| lora-moe | 3,000 | 400 | 450 | 0.900 ± 0.000 | 2 |" in dmep


def _run(path, args, summary=None, metrics=()):
    path.mkdir()
    (path / "args.json").write_text(json.dumps(args))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_reproduce_reuses_only_matching_finished_runs(tmp_path):
    from minimoe.tools.reproduce import ROWS
    from minimoe.tools.runs import finished

    def done(run, row, seed, steps, limit=100):
        return finished(tmp_path / run, ROWS[row], seed, steps, limit)

    same = {"data": "tiny-arith", "eval_limit": 100}
    epng = {"policy": "epng", "seed": 1, "steps": 300, "model": "/x/weights/tiny-moe", **same,
            "policy_options": {"final_event": False}}
    _run(tmp_path / "a", epng)
    assert done("a", "epng", 1, 300) is None  # no summary: the run did not finish
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"task_score_after": 0.4}))
    assert done("a", "epng", 1, 300) == {"task_score_after": 0.4}
    assert done("a", "epng", 1, 200) is None and done("a", "epng", 2, 300) is None
    assert done("a", "lora", 1, 300) is None and done("a", "epng-final", 1, 300) is None
    assert done("a", "epng", 1, 300, limit=200) is None  # scored on another number of test problems
    _run(tmp_path / "x", {**epng, "data": "tiny-mix"}, {"task_score_after": 0.4})
    assert done("x", "epng", 1, 300) is None  # trained on another task
    # DMEP's rows differ by model and options: a symmetric LoRA-MoE run is not a DMEP run, nor dense LoRA plain LoRA
    moe = {"policy": "dmep", "seed": 0, "steps": 300, "model": "weights/tiny-dense", **same,
           "policy_options": {"prune_step": -1}}
    _run(tmp_path / "m", moe, {"task_score_after": 0.9})
    assert done("m", "lora-moe", 0, 300) and done("m", "dmep", 0, 300) is None
    dense = {"policy": "lora", "seed": 0, "steps": 300, "model": "weights/tiny-dense", **same,
             "policy_options": {"dense_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]}}
    _run(tmp_path / "d", dense, {"task_score_after": 0.8})
    assert done("d", "dense-lora", 0, 300) and done("d", "lora", 0, 300) is None


def test_second_half_throughput_from_metrics(tmp_path):
    from minimoe.tools.runs import late_throughput

    metrics = [{"step": s, "tokens": 100 * s, "elapsed_s": float(s * s)} for s in range(1, 7)]
    _run(tmp_path / "r", {}, metrics=metrics)
    assert late_throughput(tmp_path / "r", 6) == (400 + 500 + 600) / (36.0 - 9.0)  # steps 4-6, after step 3's time
    assert late_throughput(tmp_path / "r", 20) is None  # the run never reached its second half
