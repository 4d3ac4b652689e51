"""Where ``minimoe bench`` and the self-check find the transformers (+ PEFT) routes they compare with.

The routes are ``benchmarks/reference_routes.py`` of a clone of the repository (or the file
``MINIMOE_REFERENCE_ROUTES`` names): transformers and peft are references for the tests and benchmarks, and the
package never imports them. This module finds that file and loads it when a transformers route runs; where it
cannot (a wheel has no clone beside it; the ``bench`` extra is not installed) the routes are skipped and
``unavailable`` says why.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path

ENV = "MINIMOE_REFERENCE_ROUTES"
CLONE_FILE = Path(__file__).resolve().parents[3] / "benchmarks" / "reference_routes.py"


def routes_file() -> Path:
    return Path(os.environ.get(ENV) or CLONE_FILE)


def unavailable() -> str | None:
    """Why the transformers routes cannot run here, or None when they can."""
    if not routes_file().is_file():
        return (f"the transformers routes are benchmarks/reference_routes.py of a clone of the repository "
                f"(not in the wheel): run from a clone, or set {ENV} to that file")
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'minimoe[bench]')"
    return None


@cache
def load():
    """The routes module (``setup(setup_name, implementation, directory, device, dtype)``)."""
    spec = importlib.util.spec_from_file_location("minimoe_reference_routes", routes_file())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
