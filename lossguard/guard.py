"""The framework-free engine: sample -> detectors -> findings -> recovery policy -> actions.

Integrations (the Trainer callback, the plain-loop guard) gather a ``Sample`` per optimizer step
and hand it here; the engine decides, they act. Nothing here imports torch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from lossguard.config import GuardConfig
from lossguard.records import Finding, Sample
from lossguard.recovery.policy import Decision, RecoveryPolicy


class Guard:
    """Runs every detector over each step's sample and decides what recovery should do.

    Args:
        config: the whole ``GuardConfig`` (detection and recovery sections are used here).
        max_steps, num_train_epochs: the run's length, which tells a premature plateau from
            convergence.
        detectors: anything with ``observe(sample) -> list[Finding]`` and ``state_dict()`` /
            ``load_state_dict()``; the built-in ``DetectorSuite`` by default.
    """

    def __init__(
        self,
        config: GuardConfig | None = None,
        *,
        max_steps: int | None = None,
        num_train_epochs: float | None = None,
        detectors: Any = None,
    ) -> None:
        self.config = config or GuardConfig()
        if detectors is None:
            from lossguard.signals.suite import DetectorSuite

            detectors = DetectorSuite(
                self.config.detection, max_steps=max_steps, num_train_epochs=num_train_epochs
            )
        self.detectors = detectors
        self.policy = RecoveryPolicy(self.config.recovery)
        self.findings: list[Finding] = []

    def observe(self, sample: Sample) -> list[Finding]:
        """Findings raised by this step's sample (usually none); detection only."""
        found = list(self.detectors.observe(sample))
        self.findings.extend(found)
        return found

    def decide(self, sample: Sample, snapshots: Sequence[int] = ()) -> Decision:
        """Detection and recovery for one step; ``snapshots`` are the steps a rollback can return to.

        The decision's ``findings`` hold the detectors' and the policy's own (relapse, gave up).
        """
        found = self.observe(sample)
        decision = self.policy.step(sample.step, sample.loss, found, snapshots)
        self.findings.extend(decision.findings)
        decision.findings = found + decision.findings
        return decision

    def lr_multiplier(self, step: int) -> float:
        """The factor on the scheduled LR for the optimizer step that will produce sample ``step``."""
        return self.policy.lr_multiplier(step)

    def detector_state(self) -> dict[str, Any]:
        """A copy of the detectors' memory, to be snapshotted with the weights."""
        return copy.deepcopy(self.detectors.state_dict())

    def load_detector_state(self, state: dict[str, Any]) -> None:
        self.detectors.load_state_dict(copy.deepcopy(state))

    def state_dict(self) -> dict[str, Any]:
        return {"detectors": self.detectors.state_dict(), "policy": self.policy.state_dict(),
                "n_findings": len(self.findings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detectors.load_state_dict(state["detectors"])
        if "policy" in state:
            self.policy.load_state_dict(state["policy"])
