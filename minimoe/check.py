"""Moved to ``minimoe.tools.check`` (``minimoe check``): kept so ``python -m minimoe.check`` and
``import minimoe.check`` keep working."""

import sys

from minimoe.tools import check as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
