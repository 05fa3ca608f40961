"""The telemetry line format: strict JSON, one object per line, non-finite floats as strings.

``json`` would happily write ``NaN`` and ``Infinity``, which strict parsers (browsers, jq) reject,
so every float that is not finite is written as ``"nan"``, ``"inf"`` or ``"-inf"``; readers turn
them back into floats via ``float(value)``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from lossguard.numbers import as_float as as_float  # the readers' lenient number (telemetry/foreign.py)

SCHEMA_VERSION = 1
EVENTS_FILE = "events.jsonl"

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
