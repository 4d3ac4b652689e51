"""The benchmark command runs its routes side by side and reports what it measured (no timing asserted)."""

import json
import math
import signal
import sys

import pytest
import torch
from safetensors import safe_open

import minimoe
from minimoe.tools.bench import run as bench
from minimoe.tools.bench import real as bench_real


@pytest.mark.slow
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


@pytest.mark.slow
def test_bench_fails_loudly_when_a_route_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.ROUTES, "broken", ("minimoe", "auto", "no-such-mode", "moe"))
    rc = bench.main(["--shape", "tiny", "--device", "cpu", "--batch", "1", "--seq", "8", "--steps", "1",
                     "--warmup", "0", "--threads", "1", "--routes", "broken"])
    assert rc == 1 and "1 route(s) failed" in capsys.readouterr().err


# --- real scale: the full OLMoE-1B-7B shape and its streamed checkpoint ------------------------------------
def test_the_olmoe_1b_7b_shape_is_the_shipped_config_with_defaults_that_fit_a_24_gb_cpu(capsys):
    from minimoe.model.config import ModelConfig
    from minimoe.model.reference import shipped_shapes

    shape = bench.SHAPES["olmoe-1b-7b"]
    assert list(shape) == ["moe"]  # MoE only
    shipped = shipped_shapes()["allenai/OLMoE-1B-7B-0125"]
    assert ModelConfig.from_hf_config(shape["moe"]) == ModelConfig.from_json(shipped)
    args = bench.parse_args(["--shape", "olmoe-1b-7b", "--device", "cpu"])
    assert (args.dtype, args.batch, args.seq, args.steps, args.warmup, args.stream_checkpoint) == \
        ("bfloat16", 1, 256, 2, 1, True)
    assert args.routes == ["minimoe expert LoRA r=8 gate+up", "transformers+PEFT LoRA r=8 gate+up (grouped_mm experts)"]
    args = bench.parse_args(["--shape", "olmoe-1b-7b", "--device", "cpu", "--batch", "2", "--dtype", "float32"])
    assert (args.batch, args.dtype) == (2, "float32")  # explicit flags win
    assert bench.parse_args(["--shape", "tiny", "--device", "cpu"]).batch == 4
    # a dense route is refused before anything is written
    with pytest.raises(SystemExit):
        bench.main(["--shape", "olmoe-1b-7b", "--routes", "minimoe LoRA-MoE E=8 top-2 r=8 (dense)"])
    assert "has no dense model" in capsys.readouterr().err
    # its checkpoint, planned on the meta device: 6.9B parameters, 14 GB of bf16 in shards of at most 2 GiB
    specs = bench_real.checkpoint_specs(shape["moe"])
    assert sum(math.prod(s.shape) for s in specs) == 6_919_161_856
    shards = bench_real.plan_shards(specs, torch.bfloat16, bench_real.MAX_SHARD_BYTES)
    assert len(shards) == 7 and all(sum(s.nbytes(torch.bfloat16) for s in shard) <= 2 * 2**30 for shard in shards)


def _tensors(directory):
    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_the_streamed_checkpoint_has_the_in_memory_writers_keys_and_loads_in_bf16(tmp_path, kind):
    shape = bench.SHAPES["tiny"][kind]
    for name in ("memory", "fp32", "bf16"):
        (tmp_path / name).mkdir()
    bench._save_checkpoint(shape, tmp_path / "memory", seed=0)
    info = bench_real.write_random_checkpoint(shape, tmp_path / "fp32", dtype=torch.float32, max_shard_bytes=100_000)
    assert info["files"] > 1  # sharded, with an index naming every key's shard
    ours, theirs = _tensors(tmp_path / "fp32"), _tensors(tmp_path / "memory")
    assert {k: (t.shape, t.dtype) for k, t in ours.items()} == {k: (t.shape, t.dtype) for k, t in theirs.items()}
    index = json.loads((tmp_path / "fp32" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours) and index["metadata"]["total_size"] == info["bytes"]

    bench_real.write_random_checkpoint(shape, tmp_path / "bf16", dtype=torch.bfloat16)
    got = _tensors(tmp_path / "bf16")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert all(bool((t == 1).all()) for k, t in got.items() if k.endswith("norm.weight"))
    model = minimoe.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and bool(torch.isfinite(out.logits).all()) and math.isfinite(out.loss)


@pytest.mark.slow
def test_the_real_scale_routes_run_on_a_streamed_bf16_checkpoint(tmp_path, capsys):
    routes = bench.SHAPE_DEFAULTS["olmoe-1b-7b"]["routes"]  # minimoe and transformers+PEFT, on the same shards
    out = tmp_path / "bench.json"
    rc = bench.main(["--shape", "tiny", "--device", "cpu", "--stream-checkpoint", "--dtype", "bfloat16", "--batch", "1",
                     "--seq", "16", "--steps", "1", "--warmup", "0", "--threads", "1", "--workdir", str(tmp_path),
                     "--routes", *routes, "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["route"] for r in report["results"]] == routes and not any(r["oom"] for r in report["results"])
    assert report["checkpoints"]["moe"]["streamed"] and report["checkpoints"]["moe"]["dtype"] == "bfloat16"
    assert "checkpoint: " in capsys.readouterr().out


# --- out of memory is a result -----------------------------------------------------------------------------
def test_out_of_memory_is_told_from_other_failures():
    assert "SIGKILL" in bench_real.out_of_memory(-signal.SIGKILL, "")
    cpu = "RuntimeError: [enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"
    assert "DefaultCPUAllocator" in bench_real.out_of_memory(1, f"Traceback ...\n{cpu}\n")
    assert bench_real.out_of_memory(1, "Traceback ...\nMemoryError\n") == "MemoryError"
    assert bench_real.out_of_memory(1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert bench_real.out_of_memory(1, "ValueError: no such setup") is None
    assert bench_real.out_of_memory(0, "MemoryError (a warning)") is None  # it finished
    assert bench_real.out_of_memory(-signal.SIGTERM, "") is None


# a worker that grows to 64 MiB, says how far it got, and is then killed as the OOM killer would
_KILLED = ("import os, signal, time\nprint('STAGE step 1 of 3', flush=True)\nx = b'1' * (64 * 2**20)\n"
           "time.sleep(1.0)\nos.kill(os.getpid(), signal.SIGKILL)")


def test_a_route_that_runs_out_of_memory_is_reported_and_the_run_succeeds(tmp_path, monkeypatch, capsys):
    for route in ("killed", "allocation failed"):
        monkeypatch.setitem(bench.ROUTES, route, ("minimoe", "auto", "expert-lora", "moe"))
    fake = {"killed": [sys.executable, "-c", _KILLED], "allocation failed": [sys.executable, "-c", "raise MemoryError"]}
    run_worker = bench.run_worker
    monkeypatch.setattr(bench, "run_worker", lambda cmd: run_worker(fake[cmd[cmd.index("--worker") + 1]]))
    out = tmp_path / "bench.json"
    rc = bench.main(["--shape", "tiny", "--device", "cpu", "--routes", "killed", "allocation failed",
                     "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["failed"] == []
    killed, failed = report["results"]
    assert killed["oom"] and "SIGKILL" in killed["reason"] and killed["stage"] == "step 1 of 3"
    assert killed["peak_rss_mib_seen"] >= 64  # the parent's reading of the worker, before the kill
    assert failed["oom"] and failed["reason"] == "MemoryError" and failed["step_tok_s"] is None
    printed = capsys.readouterr().out
    assert "| killed | – | out of memory | out of memory | ≥ " in printed
    assert "out of memory: killed: killed by SIGKILL" in printed and "at: step 1 of 3" in printed


# --- the cost of an EPnG event -----------------------------------------------------------------------------
@pytest.mark.slow
def test_the_epng_event_is_timed_against_the_steps_between_events(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--shape", "tiny", "--device", "cpu", "--event", "--batch", "1", "--seq", "16", "--steps", "2",
                     "--warmup", "1", "--threads", "1", "--json", str(out)])
    assert rc == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["route"] == bench_real.EVENT_ROUTE and r["interval"] == 50
    # 2 layers x 8 experts with an adapter: α = β = 0.2 prunes 3 and grows 3, within the budget
    assert (r["experts"], r["pruned"], r["grown"]) == (16, 3, 3) and r["params_after"] <= r["params_before"]
    assert r["event_s"] > 0 and r["step_s"] > 0 and r["event_pct"] > 0 and r["first_step_after_s"] > 0
    assert "event / (50 steps between events)" in capsys.readouterr().out


@pytest.mark.slow
def test_one_epoch_of_real_lengths_runs_every_mode_next_to_transformers(capsys):
    from minimoe.tools.bench.lengths import longtail

    pairs = longtail(512)
    assert pairs == longtail(512)  # seeded
    words = sorted(len(r.split()) for _, r in pairs)
    assert words[len(words) // 2] < 40 < words[-1] // 3  # long-tailed: most short, a few long
    assert bench.main(["--data", "longtail", "--rows", "48", "--batch", "8", "--max-len", "256", "--threads", "1",
                       "--reference-experts", "grouped_mm"]) == 0
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| minimoe") or line.startswith("| transformers")}
    assert list(rows) == ["minimoe, padded", "minimoe, group-by-length", "minimoe, packing",
                          "transformers+PEFT (grouped_mm experts), padded"]
    # every example once: the same target tokens padded, grouped and in transformers (steps: 48 / 8)
    assert rows["minimoe, padded"][1:3] == rows["minimoe, group-by-length"][1:3] == \
        rows["transformers+PEFT (grouped_mm experts), padded"][1:3] and rows["minimoe, padded"][1] == "6"
