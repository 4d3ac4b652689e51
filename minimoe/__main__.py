"""``python -m minimoe SUBCOMMAND ...``: the ``minimoe`` command (``minimoe/cli/main.py``)."""

import sys

from .cli import main

sys.exit(main())
