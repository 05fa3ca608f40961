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


_INF = math.inf


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


_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), default=_fallback)


def _needs_cleaning(record: dict[str, Any]) -> bool:
    for v in record.values():
        if type(v) is float:
            if v != v or v == _INF or v == -_INF:
                return True
        elif not (v is None or type(v) in (int, str, bool)):
            return True
    return False


def encode(record: dict[str, Any]) -> str:
    """One record as a single strict-JSON line (no trailing newline)."""
    # flat records of finite numbers (a sample, every step) skip the recursive clean-up
    clean = _finite_safe(record) if _needs_cleaning(record) else record
    return _ENCODER.encode(clean)


def as_float(value: Any) -> float | None:
    """A numeric field as a float, accepting the ``"nan"``/``"inf"``/``"-inf"`` spellings."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # an integer past 1e308
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        named = _NONFINITE_NAMES.get(value.strip().lower())
        if named is not None:
            return named
        try:
            return float(value)
        except ValueError:
            return None
    return None
