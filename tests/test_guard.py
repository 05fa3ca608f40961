"""The engine: detectors -> findings -> (probe verdict) -> policy -> actions, without torch."""

from __future__ import annotations

from lossguard.config import GuardConfig
from lossguard.guard import Guard
from lossguard.records import Finding, Reason, Sample, Severity


class _PlateauAt:
    """A detector stand-in that reports one premature plateau at a given step."""

    def __init__(self, step: int, onset: int):
        self.step, self.onset = step, onset

    def observe(self, sample: Sample) -> list[Finding]:
        if sample.step != self.step:
            return []
        return [Finding(Reason.EARLY_CONVERGENCE, Severity.WARNING, self.step, self.onset, "plateau since 150.")]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _run(verdict: str | None, needs_saddle: bool) -> tuple[list, list]:
    config = GuardConfig(recovery={"plateau_needs_saddle": needs_saddle})
    guard = Guard(config, max_steps=1000, detectors=_PlateauAt(300, 250))
    asked: list[int] = []

    def probe(finding: Finding) -> dict | None:
        asked.append(finding.step)
        if verdict is None:
            return {"kind": "probe", "skipped": True, "reason": "lora_b_zero"}
        return {"kind": "probe", "verdict": verdict, "ratio": -0.2 if verdict == "saddle" else 0.01,
                "lambda_max": 10.0, "lambda_min": -2.0 if verdict == "saddle" else 0.1}

    snapshots = list(range(0, 301, 25))
    findings, actions = [], []
    for step in range(1, 301):
        d = guard.decide(Sample(step=step, loss=2.0), snapshots, probe=probe)
        findings += d.findings
        actions += d.actions
    assert asked == [300]  # probed once, on the plateau, before the policy decided
    return findings, actions


def test_verdict_is_attached_to_the_plateau_finding():
    findings, _ = _run("saddle", needs_saddle=False)
    assert findings[0].evidence["probe"] == {"verdict": "saddle", "ratio": -0.2, "lambda_max": 10.0,
                                             "lambda_min": -2.0}
    assert findings[0].message == "plateau since 150. Hessian probe: saddle (lambda_min/lambda_max = -0.2)."


def test_a_minimum_triggers_no_rollback_when_recovery_needs_a_saddle():
    _, actions = _run("minimum", needs_saddle=True)
    assert actions == []
    _, actions = _run("saddle", needs_saddle=True)
    assert actions[0].action.value == "rollback" and actions[0].to_step == 150


def test_without_the_gate_any_premature_plateau_rolls_back():
    _, actions = _run("minimum", needs_saddle=False)
    assert actions[0].action.value == "rollback"


def test_a_skipped_probe_does_not_block_recovery():
    findings, actions = _run(None, needs_saddle=True)
    assert findings[0].evidence["probe"] == {"skipped": "lora_b_zero"}
    assert actions[0].action.value == "rollback"
