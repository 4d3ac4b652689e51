"""python -m minimoe.plots on real run directories, and its message when matplotlib is missing."""

import json
import sys
from pathlib import Path

from minimoe.plots import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


PNG = b"\x89PNG\r\n\x1a\n"


def _written(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run / "plots").iterdir()}


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


def test_without_matplotlib_the_command_says_how_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([str(tmp_path)]) == 2
    assert "pip install 'minimoe[plot]'" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2


def test_reproduce_table_reports_mean_and_std():
    from minimoe.reproduce import table

    runs = {"lora": [{"task_score_after": s, "task_score_before": 0.1, "trainable_parameters": 12288,
                      "tokens_per_s": 1000.0} for s in (0.2, 0.4)],
            "epng": [{"task_score_after": 0.5, "task_score_before": 0.1, "trainable_parameters": 12288,
                      "tokens_per_s": 900.0}],
            "dmep": [{"task_score_after": 1.0, "task_score_before": 0.1, "trainable_parameters": n,
                      "tokens_per_s": 500.0} for n in (3000, 2500)]}
    text = table(runs)
    assert "| lora | 12,288 | 1,000 | 0.300 ± 0.141 | 2 |" in text
    assert "| epng | 12,288 | 900 | 0.500 ± 0.000 | 1 |" in text and "before fine-tuning: 0.100" in text
    assert "| dmep | 2,500–3,000 | 500 | 1.000 ± 0.000 | 2 |" in text  # survivors differ by seed


def test_reproduce_reuses_only_matching_finished_runs(tmp_path):
    from minimoe.reproduce import finished

    run = tmp_path / "epng-seed1"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"policy": "epng", "seed": 1, "steps": 300}))
    assert finished(run, "epng", 1, 300) is None  # no summary: the run did not finish
    (run / "summary.json").write_text(json.dumps({"task_score_after": 0.4}))
    assert finished(run, "epng", 1, 300) == {"task_score_after": 0.4}
    assert finished(run, "epng", 1, 200) is None and finished(run, "epng", 2, 300) is None
    assert finished(run, "lora", 1, 300) is None
