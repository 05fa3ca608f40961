"""Lenient readers of training arguments and model attributes, and the number format of the rows."""

from __future__ import annotations

from typing import Any

from lossguard.numbers import as_float


def attr(obj: Any, name: str, default: Any = None) -> Any:
    try:
        value = getattr(obj, name, default)
    except Exception:  # properties of TrainingArguments may set up devices and fail
        return default
    return default if value is None else value


def enum_text(value: Any) -> str:
    return str(getattr(value, "value", value)).lower()


def positive_int(value: Any) -> int | None:
    f = as_float(value, finite=True)
    return int(f) if f is not None and f > 0 else None


def human(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}" if not float(n).is_integer() else str(int(n))


def dataset_len(dataset: Any) -> int | None:
    if dataset is None:
        return None
    try:
        return len(dataset)
    except Exception:
        return None
