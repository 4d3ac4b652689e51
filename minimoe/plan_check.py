"""Moved to ``minimoe.tools.plan_check`` (``minimoe plan-check``): kept so ``python -m minimoe.plan_check`` and
``import minimoe.plan_check`` keep working."""

import sys

from minimoe.tools import plan_check as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
