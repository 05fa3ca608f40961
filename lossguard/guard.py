"""The framework-free engine: sample -> detectors -> findings.

Integrations (the Trainer callback, the plain-loop guard) gather a ``Sample`` per optimizer step
and hand it here; the engine decides, they act. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

from lossguard.config import GuardConfig
from lossguard.records import Finding, Sample


class Guard:
    """Runs every detector over each step's sample and returns what they found."""

    def __init__(
        self,
        config: GuardConfig | None = None,
        *,
        max_steps: int | None = None,
        num_train_epochs: float | None = None,
    ) -> None:
        from lossguard.signals.suite import DetectorSuite

        self.config = config or GuardConfig()
        self.detectors = DetectorSuite(
            self.config.detection, max_steps=max_steps, num_train_epochs=num_train_epochs
        )
        self.findings: list[Finding] = []

    def observe(self, sample: Sample) -> list[Finding]:
        """Findings raised by this step's sample (usually none)."""
        found = self.detectors.observe(sample)
        self.findings.extend(found)
        return found

    def state_dict(self) -> dict[str, Any]:
        return {"detectors": self.detectors.state_dict(), "n_findings": len(self.findings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detectors.load_state_dict(state["detectors"])
