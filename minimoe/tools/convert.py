"""Convert a Hub checkpoint to minimoe's own layout (stacked experts, one config), which
``from_pretrained`` recognises and loads without per-expert copies.

    minimoe convert allenai/OLMoE-1B-7B-0125            # -> weights/OLMoE-1B-7B-0125-minimoe
    minimoe convert ./my-checkpoint ./my-checkpoint-minimoe --dtype bfloat16

Keys are minimoe's module names (``layers.3.mlp.experts.up_proj.weight [E, I, H]``), in
``minimoe.safetensors``; config.json, tokenizer files and generation_config.json are copied alongside.
A round trip is exact.

The result is for minimoe only, and says so: transformers, vLLM and other readers of Hub checkpoints do
not know the stacked keys and would load the config with randomly initialised experts. So the weights are
not named ``model.safetensors`` (those tools then find no weights and stop), config.json's
``architectures`` names no transformers class (``MinimoeConverted``; the original is kept in
``minimoe_source_architectures``), and ``minimoe_layout`` / ``minimoe_note`` say what the directory is.
``minimoe export --model DIR --out OUT`` writes the Hub layout back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from ..utils.files import atomic_dir, check_destination
from ..adapters.lm import from_pretrained
from ..model.hf import CONVERTED_WEIGHTS, TOKENIZER_FILES, resolve

LAYOUT = "minimoe"
LAYOUT_VERSION = 2  # 1: stacked keys in model.safetensors, Hub architectures (still loads; transformers misread it)
ARCHITECTURE = "MinimoeConverted"
NOTE = (f"minimoe's converted layout (stacked experts in {CONVERTED_WEIGHTS}): load it with "
        "minimoe.from_pretrained. transformers and vLLM cannot read it; `minimoe export --model DIR "
        "--out OUT` writes the Hub layout.")


def default_destination(src: str) -> Path:
    """``weights/<name>-minimoe`` for a Hub id or a directory."""
    return Path("weights") / f"{Path(str(src).rstrip('/')).name}-minimoe"


def convert(src: str, dst: str | Path | None = None, dtype=None, overwrite: bool = False) -> Path:
    """Write ``src`` (Hub id or directory) in minimoe's layout to ``dst``; returns ``dst``.

    An existing ``dst`` is refused (unless ``overwrite``) before the source is fetched or loaded."""
    dst = check_destination(dst or default_destination(src), overwrite, flag="--overwrite")
    source = resolve(src)
    model = from_pretrained(source, dtype=dtype)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.tied:
        state.pop("lm_head.weight")
    config = json.loads((source / "config.json").read_text())
    config.setdefault("minimoe_source_architectures", config.get("architectures"))  # a re-conversion keeps it
    config.update(architectures=[ARCHITECTURE], minimoe_layout=LAYOUT_VERSION, minimoe_note=NOTE,
                  dtype=str(model.dtype).replace("torch.", ""))
    with atomic_dir(dst, overwrite, flag="--overwrite") as tmp:
        save_file(state, str(tmp / CONVERTED_WEIGHTS), metadata={"format": "pt", "layout": LAYOUT})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        for f in TOKENIZER_FILES:
            if (source / f).is_file():
                shutil.copy2(source / f, tmp / f)
        (tmp / "README.md").write_text(f"# {dst.name}\n\nConverted from `{src}` by `minimoe convert`.\n\n"
                                       f"{NOTE}\n")
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minimoe convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="Hub id or checkpoint directory")
    p.add_argument("dst", nargs="?", help="destination (default: weights/<name>-minimoe)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="convert to this dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.dtype, args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
