"""Moved to ``minimoe.tools.reproduce`` (``minimoe reproduce``): kept so ``python -m minimoe.reproduce`` and
``import minimoe.reproduce`` keep working."""

import sys

from minimoe.tools import reproduce as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
