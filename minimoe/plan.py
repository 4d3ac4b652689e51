"""Moved to ``minimoe.tools.plan`` (``minimoe plan``): kept so ``python -m minimoe.plan`` and
``import minimoe.plan`` keep working."""

import sys

from minimoe.tools import plan as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
