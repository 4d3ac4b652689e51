"""``python eval.py ...`` in a clone of the repository: the same command as ``minimoe eval ...``
(the code is ``minimoe/eval/cli.py``)."""

import sys

from minimoe.eval.cli import build_parser, default_out, evaluation, main, write_results  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
