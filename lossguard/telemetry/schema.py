"""The telemetry line format: strict JSON, one object per line, non-finite floats as strings.

``json`` would happily write ``NaN`` and ``Infinity``, which strict parsers (browsers, jq) reject,
so every float that is not finite is written as ``"nan"``, ``"inf"`` or ``"-inf"``; readers turn
them back into floats via ``float(value)``.
"""

from __future__ import annotations

import json
import math
from typing import Any

SCHEMA_VERSION = 1
EVENTS_FILE = "events.jsonl"

_NONFINITE_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _finite_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return "nan"
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {str(k): _finite_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_safe(v) for v in value]
    return value


def _fallback(value: Any) -> Any:
    # numpy scalars, enums, paths: anything with a plain-value meaning
    if hasattr(value, "item"):
        return _finite_safe(value.item())
    if hasattr(value, "value"):
        return value.value
    return str(value)


def encode(record: dict[str, Any]) -> str:
    """One record as a single strict-JSON line (no trailing newline)."""
    return json.dumps(_finite_safe(record), allow_nan=False, separators=(",", ":"), default=_fallback)


def as_float(value: Any) -> float | None:
    """A numeric field as a float, accepting the ``"nan"``/``"inf"``/``"-inf"`` spellings."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        named = _NONFINITE_NAMES.get(value.strip().lower())
        if named is not None:
            return named
        try:
            return float(value)
        except ValueError:
            return None
    return None
