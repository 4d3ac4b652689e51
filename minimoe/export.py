"""Moved to ``minimoe.tools.export_adapter`` (``minimoe export``): kept so ``python -m minimoe.export`` and
``import minimoe.export`` keep working."""

import sys

from minimoe.tools import export_adapter as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
