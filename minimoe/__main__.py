"""``python -m minimoe SUBCOMMAND ...``: the ``minimoe`` command (``minimoe/cli.py``)."""

import sys

from .cli import main

sys.exit(main())
