"""Writing model-card values as TOML (the standard library reads TOML but cannot write it).

Shared by every script that writes a card (``models/train.py``, ``models/quantize.py``,
``xray_triage/export``), so cards are written one way.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key(key: str) -> str:
    """A bare key when TOML allows one, else a quoted key."""
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any, digits: int | None = None) -> str:
    """One TOML value; floats rounded to ``digits`` decimals when given."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(round(value, digits) if digits is not None else value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v, digits) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
