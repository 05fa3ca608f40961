"""The contract every detector keeps: one sample in, at most one finding out, state that rolls back."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from lossguard.records import Finding, Sample


@runtime_checkable
class Detector(Protocol):
    """A streaming detector of one kind of training trouble.

    ``update`` is called once per logged optimizer step, in step order, and returns a finding
    only when a new episode of trouble starts (not on every step it lasts). Detectors are pure:
    they never touch the model, and their whole memory is in ``state_dict()`` so that recovery
    can roll them back together with the weights.
    """

    name: str

    def update(self, sample: Sample) -> Finding | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def fmt(value: float) -> str:
    """A number as a message shows it: 4 significant digits, no exponent for everyday sizes."""
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    a = abs(value)
    if a != 0 and (a < 1e-3 or a >= 1e6):
        return f"{value:.3g}"
    return f"{value:.4g}"
