"""``python train.py ...`` in a clone of the repository: the same command as ``minimoe train ...``
(the code is ``minimoe/cli/train.py``)."""

import sys

from minimoe.cli.train import main, resolve, task_score  # noqa: F401  (what scripts importing train.py use)

if __name__ == "__main__":
    sys.exit(main())
