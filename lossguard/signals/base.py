"""The contracts of the signals layer: what a detector is (fed ``Sample``s one at a time, or
``Columns`` of many), and what the engine (``Guard``) needs from a suite. Adding a detector is one file that keeps ``Detector`` and
one entry in ``signals/suite.py``'s ``DETECTORS``; a step that judges findings after the detectors
(evidence for or against them) keeps ``Stage`` and is one entry in ``STAGES``."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from lossguard.records import Columns, Finding, Sample


@runtime_checkable
class Detector(Protocol):
    """A streaming detector of one kind of training trouble.

    ``update`` is called once per logged optimizer step, in step order, and returns a finding
    only when a new episode of trouble starts (not on every step it lasts). ``update_many`` is
    the same over a stretch of steps at once (offline analysis): the same findings, as (row,
    finding) pairs, and the same state afterwards. Detectors are pure: they never touch the
    model, and their whole memory is in ``state_dict()`` (JSON-ready) so that recovery can roll
    them back together with the weights; after such a rollback, ``reset_after_rollback`` lets
    them forget the streaks of the abandoned branch.
    """

    name: str

    def update(self, sample: Sample) -> Finding | None: ...

    def update_many(self, columns: Columns) -> list[tuple[int, Finding]]: ...

    def reset_after_rollback(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Stage(Protocol):
    """A step after the detectors: weighs the findings one step raised (in detector order)
    against evidence the detectors do not see, and returns the ones to report (kept, changed,
    or dropped). Stateful like a detector."""

    name: str

    def review(self, findings: list[Finding], step: int) -> list[Finding]: ...

    def reset_after_rollback(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Suite(Protocol):
    """What the engine (``Guard``) needs from its detectors: ``DetectorSuite``, or a stand-in."""

    def observe(self, sample: Sample) -> list[Finding]: ...

    def reset_after_rollback(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
