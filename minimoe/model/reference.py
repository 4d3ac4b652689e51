"""The ``config.json`` of a checkpoint without its weights: the reference checkpoints' shapes shipped with
minimoe (``model/shapes/OWNER--NAME.json``, offline; see ``shapes/SOURCES.md``), or any Hub id's config.json
alone, through the Hub cache (``HF_HUB_OFFLINE=1`` never touches the network). What ``minimoe plan``
builds its meta-device model from."""

from __future__ import annotations

import os
from pathlib import Path

from .config import ModelConfig

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"


def shipped_shapes() -> dict[str, Path]:
    """``{Hub id: config.json}`` of the reference checkpoints shipped with minimoe (``model/shapes``)."""
    return {p.stem.replace("--", "/"): p for p in sorted(SHAPES_DIR.glob("*.json"))}


def hub_config(name: str, revision: str | None = None, tried: str = "") -> tuple[ModelConfig, str]:
    """The ModelConfig of Hub id ``name`` from its config.json only, and where it came from; a
    FileNotFoundError naming ``name`` and what else was ``tried`` when it cannot be read."""
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        file = hf_hub_download(name, "config.json", revision=revision, local_files_only=offline)
    except Exception as e:  # offline cache miss, no network, no such repo, gated repo
        hint = " (HF_HUB_OFFLINE is set: only the Hub cache is read)" if offline else ""
        raise FileNotFoundError(
            f"--model {name!r}: not a local directory, {tried}, and its config.json could not be read from the "
            f"Hub{hint}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return ModelConfig.from_json(file).replace(name_or_path=name), f"Hub config.json of {name} ({file})"
