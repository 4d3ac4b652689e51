"""The tiny pretrained models that ship inside the package (``minimoe/weights/``), found by name from any
installed copy: ``--model tiny-moe`` / ``--model tiny-dense`` and ``from_pretrained("tiny-moe")`` name them,
and ``train`` fine-tunes one when no ``--model`` is given. A local directory of the same name wins."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = ("tiny-moe", "tiny-dense")  # tiny-moe: OLMoE architecture; tiny-dense: Qwen3 (DMEP's dense setting)


def shipped(name: str) -> Path:
    """The directory of the shipped model ``name``; an error that names what is missing when the install lacks it
    (a wheel built without its package data, or files deleted) — never a random model in its place."""
    if name not in SHIPPED:
        raise KeyError(f"{name!r} is not a shipped model; shipped: {', '.join(SHIPPED)}")
    directory = WEIGHTS / name
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"the shipped model {name} is incomplete in this install: {directory} lacks "
                                f"{', '.join(missing)} (reinstall minimoe, or name a checkpoint with --model)")
    return directory


def shipped_name(model: str | Path) -> str | None:
    """The shipped model that ``model`` names, or None: its name (unless a local directory has that name), a
    path to it, or a path of the layout before the models moved into the package (``weights/tiny-moe`` beside
    ``train.py``, as saved runs and adapters of earlier versions record it) that no longer exists."""
    path = Path(model).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        return next((n for n in SHIPPED if resolved == (WEIGHTS / n).resolve()), None)
    if str(model) in SHIPPED:
        return str(model)
    if path.name in SHIPPED and path.parent.name == "weights" and not path.exists():
        return path.name
    return None
