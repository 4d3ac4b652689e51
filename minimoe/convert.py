"""Moved to ``minimoe.tools.convert`` (``minimoe convert``): kept so ``python -m minimoe.convert`` and
``import minimoe.convert`` keep working."""

import sys

from minimoe.tools import convert as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
