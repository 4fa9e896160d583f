"""Hide the packages named in DOPPEL_HIDE (comma-separated), as if they were not installed: a module set to None in
sys.modules fails to import, and importlib.util.find_spec returns None for it."""

import os
import sys

for name in filter(None, os.environ.get("DOPPEL_HIDE", "").split(",")):
    sys.modules[name] = None  # type: ignore[assignment]
