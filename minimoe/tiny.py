"""Moved to ``minimoe.tools.tiny`` (``minimoe tiny``): kept so ``python -m minimoe.tiny`` and
``import minimoe.tiny`` keep working."""

import sys

from minimoe.tools import tiny as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
