"""Numbers in and out: the one lenient reader of a number from a log, a config or a checkpoint,
and the one way a message shows a number. Stdlib only."""

from __future__ import annotations

import math
from typing import Any

MAX_STEP = 2**53  # beyond it a "step" is damage, not a step (and would overflow int64 columns)
_INT64 = 2.0**63 - 1024  # the largest float below 2**63: what an int64 column can hold


def as_float(value: Any, *, finite: bool = False) -> float | None:
    """A number read leniently: an int, a float, a numeric string (``"nan"``, ``"inf"`` and
    ``"-inf"`` included, as the log writes non-finite values), a numpy scalar. None when it is
    missing, a bool or unreadable; an integer past 1e308 is as infinite as a float gets. With
    ``finite``, a NaN or an infinity is None too."""
    if type(value) is float:
        f = value
    elif value is None or value is True or value is False:
        return None
    else:
        try:
            f = float(value)
        except (TypeError, ValueError):
            return None
        except OverflowError:  # an integer past 1e308
            f = math.inf if value > 0 else -math.inf
    if finite and f - f != 0.0:  # NaN or infinite
        return None
    return f


def as_int(value: Any, lo: float = -_INT64, hi: float = _INT64) -> int | None:
    """A whole number read leniently (as ``as_float``, a fraction cut towards zero); None when it
    is missing, not finite or outside ``[lo, hi]`` (by default what an int64 holds)."""
    f = as_float(value, finite=True)
    return int(f) if f is not None and lo <= f <= hi else None


def as_step(value: Any) -> int | None:
    """A step or step count read from a log: a whole number in [0, MAX_STEP], else None."""
    if type(value) is int:  # the usual case, first
        return value if 0 <= value <= MAX_STEP else None
    return as_int(value, 0, MAX_STEP)


def fmt(value: float | None, missing: str = "-") -> str:
    """A number as a message shows it: 4 significant digits, 3 with an exponent for the very
    small and the very large; ``nan``/``inf`` as such; ``missing`` for None."""
    if value is None:
        return missing
    if value != value or value in (math.inf, -math.inf):
        return str(value)
    a = abs(value)
    if a != 0 and (a < 1e-3 or a >= 1e6):
        return f"{value:.3g}"
    return f"{value:.4g}"
