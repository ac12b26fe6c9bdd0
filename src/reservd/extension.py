"""Which twin a hot path calls: the C one when built, the Python definition otherwise.

``RESERVD_NO_EXT=1`` picks the definitions (CI runs the suite once that way);
``RESERVD_REQUIRE_EXT=1`` makes a missing C module an error instead of a quiet fallback.
"""
from __future__ import annotations

import importlib
import os
from typing import Any


def compiled(module: str, name: str, definition: Any) -> Any:
    """``module``'s ``name`` (e.g. "reservd._mirrorargs", "fields_text") if that C module is
    built and allowed, else ``definition``."""
    if os.environ.get("RESERVD_NO_EXT") == "1":
        return definition
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        if os.environ.get("RESERVD_REQUIRE_EXT") == "1":
            raise
        return definition
