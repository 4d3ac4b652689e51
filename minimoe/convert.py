"""Convert a Hub checkpoint to minimoe's own layout (stacked experts, one config), which
``from_pretrained`` recognises by its keys and loads without per-expert copies.

    python -m minimoe.convert allenai/OLMoE-1B-7B-0125            # -> weights/OLMoE-1B-7B-0125-minimoe
    python -m minimoe.convert ./my-checkpoint ./my-checkpoint-minimoe --dtype bfloat16

Keys are minimoe's module names (``layers.3.mlp.experts.up_proj.weight [E, I, H]``); config.json,
tokenizer files and generation_config.json are copied alongside. A round trip is exact.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from .export import TOKENIZER_FILES
from .files import atomic_dir
from .hf import from_pretrained, resolve

LAYOUT = "minimoe"


def convert(src: str, dst: str | Path | None = None, dtype=None, overwrite: bool = False) -> Path:
    source = resolve(src)
    model = from_pretrained(src, dtype=dtype)
    dst = Path(dst) if dst else Path("weights") / f"{Path(str(src).rstrip('/')).name}-minimoe"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.tied:
        state.pop("lm_head.weight")
    with atomic_dir(dst, overwrite, flag="--overwrite") as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "layout": LAYOUT})
        config = json.loads((source / "config.json").read_text())
        config["minimoe_layout"] = 1
        config["dtype"] = str(model.dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        for f in TOKENIZER_FILES:
            if (source / f).is_file():
                shutil.copy2(source / f, tmp / f)
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minimoe.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="Hub id or checkpoint directory")
    p.add_argument("dst", nargs="?", help="destination (default: weights/<name>-minimoe)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="convert to this dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.dtype, args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
