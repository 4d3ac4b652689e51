"""Moved to ``minimoe.tools.scaling`` (``minimoe scaling``): kept so ``python -m minimoe.scaling`` and
``import minimoe.scaling`` keep working."""

import sys

from minimoe.tools import scaling as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
