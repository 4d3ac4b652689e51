"""Moved to ``minimoe.tools.plots`` (``minimoe plots``): kept so ``python -m minimoe.plots`` and
``import minimoe.plots`` keep working."""

import sys

from minimoe.tools import plots as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
