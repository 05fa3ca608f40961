"""The preflight table: rows with a status and advice, and the facts behind them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(str, enum.Enum):
    """How a preflight row reads: fine, worth knowing, or worth changing before training."""

    OK = "ok"
    INFO = "info"
    WARN = "warn"


@dataclass
class PreflightRow:
    """One line of the preflight table; ``advice`` says what to change when ``status`` is warn."""

    name: str
    value: str
    status: Status = Status.OK
    advice: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "value": self.value, "status": self.status.value, "advice": self.advice}


@dataclass
class PreflightReport:
    """The preflight rows plus the numbers behind them (``facts``, for telemetry and tests)."""

    rows: list[PreflightRow] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        """One sentence per warn row: what is wrong and what to change."""
        return [f"{r.name}: {r.value}; {r.advice}" if r.advice else f"{r.name}: {r.value}"
                for r in self.rows if r.status is Status.WARN]

    def row(self, name: str) -> PreflightRow | None:
        """The row called ``name``, if that check ran."""
        return next((r for r in self.rows if r.name == name), None)

    def to_record(self) -> dict[str, Any]:
        """The telemetry record (kind ``preflight``)."""
        return {
            "kind": "preflight",
            "rows": [r.to_dict() for r in self.rows],
            "warnings": self.warnings,
            "facts": dict(self.facts),
        }
