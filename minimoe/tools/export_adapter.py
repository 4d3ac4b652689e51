"""Deploy a fine-tune elsewhere: a merged Hub-layout checkpoint, or a PEFT adapter (``adapters/export.py``).

    minimoe export --adapter ADAPTER_DIR --out weights/my-merged   # --model BASE: default, the adapter's base
    minimoe export --model BASE --adapter ADAPTER_DIR --out runs/x/peft --peft
    minimoe export --model weights/x-minimoe --out weights/x    # no adapter: a Hub-layout copy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..adapters.base import AdapterError
from ..adapters.io import adapter_base_model
from ..utils.files import Unwritable, check_destination, check_writable, write_failure
from ..adapters.export import export_merged, export_peft, merged_state_dict, peft_tensors

__all__ = ["export_merged", "export_peft", "main", "merged_state_dict", "peft_tensors"]


def main(argv=None) -> int:
    from ..adapters.lm import from_pretrained

    p = argparse.ArgumentParser(prog="minimoe export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model: Hub id or directory (default: the base the adapter records)")
    p.add_argument("--adapter", help="a minimoe adapter directory (minimoe.save_adapter); omit for a plain copy")
    p.add_argument("--out", required=True, help="destination directory")
    p.add_argument("--peft", action="store_true", help="write a PEFT adapter instead of a merged checkpoint")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the base (default: its own)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument("--no-check-base", action="store_true",
                   help="load the adapter even if --model is not the base it was saved on")
    args = p.parse_args(argv)
    if not args.model and not args.adapter:
        p.error("--model is required without --adapter")
    try:
        check_destination(args.out, args.overwrite, flag="--overwrite")  # before loading anything
        check_writable(Path(args.out).parent)  # a read-only or impossible destination costs nothing either
        model = from_pretrained(args.model or adapter_base_model(args.adapter), dtype=args.dtype)
        if args.adapter:
            model.load_adapter(args.adapter, check_base=not args.no_check_base)
        try:
            path = (export_peft if args.peft else export_merged)(model, args.out, overwrite=args.overwrite)
        except Exception as e:  # a full disk, a file-size limit: the OS's reason, whichever writer met it
            if isinstance(e, FileExistsError) or (reason := write_failure(e)) is None:
                raise
            # written aside and renamed (files.atomic_dir): an existing OUT is as it was, no temporary is left
            print(f"error: cannot write {args.out}: {reason}", file=sys.stderr)
            return 1
    except Unwritable as e:  # found before anything was loaded
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileExistsError:
        print(f"error: {args.out} already exists; pass --overwrite to replace it (nothing was written)",
              file=sys.stderr)
        return 2
    except (AdapterError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {'PEFT adapter' if args.peft else 'merged checkpoint'} to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
