"""The benchmark command runs its routes side by side and reports what it measured (no timing asserted)."""

import json

from minimoe import bench


def test_bench_runs_minimoe_and_transformers_routes_on_the_same_model(tmp_path, capsys):
    routes = ["minimoe full", "transformers full (grouped_mm experts)", "minimoe expert LoRA r=8 gate+up",
              "transformers+PEFT LoRA r=8 gate+up (grouped_mm experts)", "minimoe LoRA-MoE E=8 top-2 r=8 (dense)"]
    out = tmp_path / "bench.json"
    rc = bench.main(["--shape", "tiny", "--device", "cpu", "--batch", "1", "--seq", "16", "--steps", "1",
                     "--warmup", "0", "--threads", "1", "--routes", *routes, "--json", str(out)])
    assert rc == 0
    got = {r["route"]: r for r in json.loads(out.read_text())["results"]}
    assert list(got) == routes
    assert all(r["fwd_bwd_tok_s"] > 0 and r["step_tok_s"] > 0 and r["peak_mib"] > 0 for r in got.values())
    # same weights, same batch: full fine-tuning trains the same number of parameters in both libraries
    assert got["minimoe full"]["trainable"] == got["transformers full (grouped_mm experts)"]["trainable"]
    # minimoe's expert LoRA: r=8 on gate+up of 8 experts in 2 layers, (in + out) = 64 + 32 each
    assert got["minimoe expert LoRA r=8 gate+up"]["trainable"] == 2 * 8 * 2 * 8 * (64 + 32)
    assert "| minimoe full |" in capsys.readouterr().out


def test_bench_fails_loudly_when_a_route_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.ROUTES, "broken", ("minimoe", "auto", "no-such-mode", "moe"))
    rc = bench.main(["--shape", "tiny", "--device", "cpu", "--batch", "1", "--seq", "8", "--steps", "1",
                     "--warmup", "0", "--threads", "1", "--routes", "broken"])
    assert rc == 1 and "1 route(s) failed" in capsys.readouterr().err
