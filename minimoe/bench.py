"""Moved to ``minimoe.tools.bench.run`` (``minimoe bench``): kept so ``python -m minimoe.bench`` and
``import minimoe.bench`` keep working."""

import sys

from minimoe.tools.bench import run as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
