"""Named write errors (issue 21, item 6): a write of a training run or an export that the operating system refuses
is one line, ``cannot write PATH: <the OS's reason>``, and what was saved before stays.

The failures are real, not mocked: the commands run in a subprocess under a file-size limit (``RLIMIT_FSIZE``,
with ``SIGXFSZ`` ignored), so every write past the limit fails with ``EFBIG``, "File too large", inside Python,
safetensors or torch, just as a full disk fails with ``ENOSPC``. (A full disk needs a tiny mounted filesystem,
hence root; the limit needs nothing.) The limits are set between the sizes of the files the run wrote, so the
logs still fit and the chosen file does not."""

import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from minimoe.cli import train
from minimoe.tools import export_adapter
from minimoe.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--policy", "epng", "--model", "tiny-olmoe", "--save-every", "2", "--eval-limit", "0"]


def _limit(size: int | None):
    """For ``preexec_fn``: writes past ``size`` bytes fail with EFBIG (not a SIGXFSZ that kills the process)."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return preexec if size is not None else None


def _run(args: list, limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=_limit(limit), timeout=600)


def _minimoe(*args, limit: int | None = None) -> subprocess.CompletedProcess:
    return _run(["-m", "minimoe", *args], limit)


def _files(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir())}


def _one_line_error(done: subprocess.CompletedProcess, line: str, status: int = 1) -> None:
    assert done.returncode == status, done.stdout[-2000:] + done.stderr[-4000:]
    assert line in done.stderr.splitlines(), done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 4-step EPnG run: checkpoints at steps 2 and 4, its adapter exported, its preset base in RUN/base."""
    run = tmp_path_factory.mktemp("write-errors") / "run"
    done = _minimoe(*TRAIN, "--steps", "4", "--out", run)
    assert done.returncode == 0, done.stderr[-4000:]
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.pt"])
def test_a_failed_checkpoint_write_is_one_line_and_the_previous_checkpoint_stays(finished_run, tmp_path, failing):
    """Resumed to step 8, the run's next checkpoint (step 6) cannot be written: safetensors fails on the weights,
    or torch on the optimizer state (it used to say only ``[enforce fail at inline_container.cc:672] . unexpected
    pos N vs M``). The run stops with status 1 and one line naming the checkpoint and the reason; the step-4
    checkpoint is byte for byte as it was, loads, and the run resumes from it once the disk has room."""
    run = _copy(finished_run, tmp_path)
    checkpoint = run / "checkpoint"
    before = _files(checkpoint)
    sizes = {name: len(data) for name, data in before.items()}
    logs = max(f.stat().st_size for f in run.iterdir() if f.is_file())
    # safetensors first: half its file; torch's optimizer.pt, written next: past the weights, short of itself
    limit = sizes["model.safetensors"] // 2 if failing == "model.safetensors" else \
        (sizes["model.safetensors"] + sizes["optimizer.pt"]) // 2
    assert 4 * logs < limit < sizes[failing] and (failing == "model.safetensors" or sizes["model.safetensors"] < limit)

    done = _minimoe("train", "--resume", run, "--steps", "8", limit=limit)
    _one_line_error(done, f"error: cannot write {checkpoint}: File too large")
    assert _files(checkpoint) == before
    assert not list(run.glob(".checkpoint.*")), list(run.iterdir())  # neither .checkpoint.tmp-* nor .old
    assert ckpt.read_info(checkpoint)["step"] == 4
    assert load_file(str(checkpoint / "model.safetensors"))
    assert ckpt.load_pickle(checkpoint / "optimizer.pt")["optimizer"]["state"]
    assert ckpt.load_pickle(checkpoint / "state.pt")["rng"]
    if failing == "optimizer.pt":  # (once is enough: a resume is a training run; in this process, to be quick)
        assert train.main(["--resume", str(run), "--steps", "6"]) == 0
        assert ckpt.read_info(checkpoint)["step"] == 6


EXPORT = """
import sys
from minimoe.adapters.lm import from_pretrained
from minimoe.train.run_dir import RunDir, RunDirError

run = sys.argv[1]
model = from_pretrained(run + "/base")
model.load_adapter(run + "/adapter")
try:
    RunDir(run).export(model)
except RunDirError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
"""


def test_a_failed_adapter_export_of_a_run_is_one_line_and_the_previous_adapter_stays(finished_run, tmp_path):
    """The run's last write, RUN/adapter (``RunDir.export`` → ``save_adapter``: safetensors), fails: one line
    naming RUN/adapter, the adapter exported before is as it was, and no temporary directory is left."""
    run = _copy(finished_run, tmp_path)
    adapter = run / "adapter"
    before = _files(adapter)
    limit = len(before["adapter.safetensors"]) // 2
    assert len(before["adapter_config.json"]) < limit
    done = _run(["-c", textwrap.dedent(EXPORT), run], limit=limit)
    _one_line_error(done, f"error: cannot write {adapter}: File too large")
    assert _files(adapter) == before
    assert not list(run.glob(".adapter.*"))


@pytest.mark.parametrize("kind", ["merged", "peft"])
def test_a_failed_minimoe_export_is_one_line_and_leaves_nothing(finished_run, tmp_path, kind):
    """``minimoe export`` (a merged Hub checkpoint, or a PEFT adapter) into a destination whose weights cannot be
    written: status 1, one line naming OUT; no OUT, no temporary; over an existing OUT (--overwrite), OUT
    stays as it was."""
    peft = ["--peft"] if kind == "peft" else []

    def export(out: Path, *more, limit: int | None = None) -> subprocess.CompletedProcess:
        return _minimoe("export", "--adapter", finished_run / "adapter", "--out", out, *peft, *more, limit=limit)

    out = tmp_path / "exported"  # written in this process (quicker); the failures need their own, limited
    assert export_adapter.main(["--adapter", str(finished_run / "adapter"), "--out", str(out), *peft]) == 0
    before = _files(out)
    sizes = {name: len(data) for name, data in before.items()}
    small = [name for name, size in sizes.items() if size < 20_000]  # config, tokenizer, README
    assert len(small) == len(sizes) - 1 and max(sizes.values()) > 40_000, sizes

    fresh = tmp_path / "fresh"
    _one_line_error(export(fresh, limit=20_000), f"error: cannot write {fresh}: File too large")
    assert not fresh.exists() and not list(tmp_path.glob(".fresh.*"))

    _one_line_error(export(out, "--overwrite", limit=20_000), f"error: cannot write {out}: File too large")
    assert _files(out) == before and not list(tmp_path.glob(".exported.*"))


def test_the_os_reason_is_read_from_each_writers_message():
    """safetensors names the OS error by number, in the form of its version (0.8: ``(os error 27)``; older:
    ``IoError(Os { code: 28, ... })``); torch's own writer often names none, and then nothing is made up."""
    from safetensors import SafetensorError

    from minimoe.utils.files import write_failure

    assert write_failure(SafetensorError("Error while serializing: I/O error: File too large (os error 27)")) == \
        "File too large"
    assert write_failure(SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                         'message: "No space left on device" })')) == "No space left on device"
    assert write_failure(SafetensorError("Error while deserializing header: HeaderTooLarge")) is None  # not a write
    opaque = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 948160 vs 948080")
    assert write_failure(opaque) == f"torch's writer failed ({opaque})"
    assert write_failure(RuntimeError("The size of tensor a (3) must match")) is None
    assert write_failure(PermissionError(13, "Permission denied")) == "Permission denied"
