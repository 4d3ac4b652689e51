"""``minimoe check --device cpu --quick``: every check runs, passes (or skips for a stated reason),
the table is printed, and a failing check makes the exit code 1. (The CUDA path has not run in CI.)"""

import contextlib
import importlib.util
import io
import re

import pytest
import torch

from minimoe.tools import check

from minimoe.tools import check_numerics

ROW = re.compile(r"^(?P<name>.+?)\s{2,}(?P<status>PASS|FAIL|SKIP)\s+(?P<secs>[\d.]+)s\s+(?P<detail>.+)$")
HAVE_TRANSFORMERS = all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))


def _run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = check.main(argv)
    text = out.getvalue()
    lines = text.splitlines()
    header = lines.index(next(x for x in lines if x.startswith("check ")))
    rows = {}
    for line in lines[header + 2:]:
        if not line.strip():
            break
        m = ROW.match(line)
        assert m, line
        rows[m["name"]] = (m["status"], m["detail"])
    return rc, text, rows


@pytest.fixture(scope="module")
def quick_run():
    return _run(["--device", "cpu", "--quick"])


@pytest.mark.slow
def test_every_check_runs_and_passes_or_skips_for_a_reason(quick_run):
    rc, text, rows = quick_run
    assert rc == 0, text
    assert list(rows) == [name for name, _ in check.checks()]  # every check, in order, one row each
    for name, (status, detail) in rows.items():
        if status == "SKIP":  # the only reason a CPU run may skip: the reference libraries are missing
            assert name.startswith("transformers ") and "not importable" in detail, (name, detail)
        else:
            assert status == "PASS", (name, detail)
    if HAVE_TRANSFORMERS:
        assert all(status == "PASS" for status, _ in rows.values())
    assert "checks passed or skipped" in text and "FAILED" not in text


@pytest.mark.slow  # the module's one quick self-check run (quick_run) takes ~20 s
def test_the_table_reports_the_measured_numbers(quick_run):
    _, _, rows = quick_run
    for family in check.FAMILIES:  # on the CPU the "device" copy runs the very same fp32 computation
        status, detail = rows[f"parity {family}"]
        assert detail.startswith("fp32 max 0.0e+00 (tol 0.0001); bf16 median "), detail
        median = float(re.search(r"bf16 median ([\d.e+-]+)", detail)[1])
        assert 0 < median <= check_numerics.BF16_REL_TOL  # bf16 really differs from fp32, within tolerance
    grads = rows["adapter gradients"][1]
    assert grads.startswith("float32 LoRALinear 0.0e+00, ResizableLoRAExpert 0.0e+00, PrunableLoRAMoE 0.0e+00"), grads
    assert "bit-identical" in rows["grow/shrink state"][1]
    epng = rows["epng resume"][1]
    assert "max diff 0.0e+00, B diff/B 0.0e+00, losses max rel 0.0e+00 (weights and losses must be exactly" in epng
    assert re.search(r"; [1-9]\d* events identical", epng), epng  # probes and prune/grow events, as one run
    bench = rows["benchmark"][1]
    assert bench.startswith("tiny: minimoe ") and "tok/s" in bench
    if HAVE_TRANSFORMERS:
        assert "PEFT grouped_mm" in bench and "vs PEFT grouped_mm" in bench
    else:
        assert "skipped (transformers/peft not installed)" in bench


def test_a_tolerance_violation_fails_the_run(monkeypatch):
    monkeypatch.setattr(check_numerics, "FP32_TOL", -1.0)  # no difference can be below it
    rc, text, rows = _run(["--device", "cpu", "--only", "parity tiny-olmoe"])
    assert rc == 1
    assert list(rows) == ["parity tiny-olmoe"] and rows["parity tiny-olmoe"][0] == "FAIL"
    assert "FAILED: parity tiny-olmoe" in text


def test_an_exception_inside_a_check_is_a_fail_with_its_message(monkeypatch):
    def broken(device, quick):
        raise RuntimeError("injected failure")

    real = check.checks()
    monkeypatch.setattr(check, "checks", lambda: [("broken", broken), *real])
    rc, _, rows = _run(["--device", "cpu", "--only", "broken", "grow/shrink"])
    assert rc == 1
    assert rows["broken"] == ("FAIL", "RuntimeError: injected failure")
    assert rows["grow/shrink state"][0] == "PASS"  # the other checks still run


def test_unknown_check_and_missing_cuda_are_flag_errors(capsys):
    with pytest.raises(SystemExit) as e:
        check.main(["--device", "cpu", "--only", "nothing"])
    assert e.value.code == 2 and "--only nothing: no check matches" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check.main(["--device", "tpu"])
    assert "--device tpu: use cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            check.main(["--device", "cuda"])
        assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


def test_events_compare_exactly_on_cpu_and_to_a_relative_1e_4_on_cuda():
    a = [{"event": "prune_grow", "step": 2, "importance": [0.123456, 0.5], "elapsed_s": 1.0}]
    b = [{"event": "prune_grow", "step": 2, "importance": [0.1234561, 0.5], "elapsed_s": 9.0}]
    assert check._first_difference(a, b, exact=False) is None  # rel 8e-7; wall-clock fields skipped
    c = [{**b[0], "importance": [0.1235, 0.5]}]
    assert check._first_difference(a, c, exact=False) == "[0].importance[0] (0.123456 vs 0.1235)"  # rel 3.6e-4
    assert check._first_difference(a, b, exact=True) == "[0].importance[0] (0.123456 vs 0.1234561)"
    assert check._first_difference(a, [{**b[0], "step": 4}], exact=False) == "[0].step (2 vs 4)"
    assert check._first_difference(a, a + a, exact=True) == " (length 1 vs 2)"


@pytest.mark.slow
def test_benchmark_without_the_reference_libraries_reports_their_routes_skipped(monkeypatch):
    from minimoe.tools.bench import reference

    # as where transformers/peft are not installed (its message then; the same for a wheel without the routes)
    monkeypatch.setattr(reference, "unavailable", lambda: "transformers/peft not installed")
    rc, _, rows = _run(["--device", "cpu", "--only", "benchmark"])
    status, detail = rows["benchmark"]
    assert rc == 0 and status == "PASS"
    assert re.fullmatch(r"tiny: minimoe [\d,]+ tok/s, PEFT grouped_mm skipped \(transformers/peft not installed\), "
                        r"PEFT eager skipped \(transformers/peft not installed\) \(throughput is reported, not judged\)",
                        detail), detail


def test_a_resume_that_loses_the_optimizer_state_fails_the_epng_check(monkeypatch):
    from minimoe.train.trainer import Trainer

    real = Trainer.resume

    def forgetful(self, saved):
        real(self, saved)
        self.optimizer.state.clear()  # a resume bug: AdamW's moments and step counts not restored

    monkeypatch.setattr(Trainer, "resume", forgetful)
    rc, _, rows = _run(["--device", "cpu", "--only", "epng"])
    status, detail = rows["epng resume"]
    assert rc == 1 and status == "FAIL"
    ratio = float(re.search(r"B diff/B ([\d.e+-]+)", detail)[1])
    loss_rel = float(re.search(r"losses max rel ([\d.e+-]+)", detail)[1])
    assert ratio > check.RESUME_CUDA_TOL and loss_rel > 0, detail  # caught on the CPU and by the CUDA tolerance
