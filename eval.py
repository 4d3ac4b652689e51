"""``python eval.py ...`` in a clone of the repository: the same command as ``minimoe eval ...``
(the code is ``minimoe/cli/eval.py``)."""

import sys

from minimoe.cli.eval import build_parser, default_out, evaluation, main, write_results  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
