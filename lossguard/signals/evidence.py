"""Evidence beyond the curve: a plateau or a divergence is weighed before anyone acts on it.

The detectors read the training loss's shape. A flat stretch is also what a healthy fine-tune
looks like once it has learned what the data holds, so a finding that would roll training back
must rest on more:

- **references** (``references.py``): a plateau at the unigram or uniform level has learned
  nothing from its inputs (corroborated); one far below them has learned, and its flat stretch
  is most likely convergence (shape only);
- **the eval loss**: still falling while the training loss sits flat contradicts a plateau;
  not rising while the training loss climbs contradicts a divergence.

A corroborated finding keeps its severity (``warning``: recovery may act on it). A shape-only
or contradicted one becomes ``info``: reported with advice, never acted on. Each finding records
what it rests on (``evidence["support"]``, ``evidence["confidence"]``).
"""

from __future__ import annotations

from typing import Any

from lossguard.config import DetectionConfig
from lossguard.numbers import fmt
from lossguard.records import Finding, Reason, Severity
from lossguard.signals.references import References

_MAX_EVALS = 256


def eval_trend(evals: list[tuple[int, float]], since: int, step: int, rel: float = 0.01) -> str | None:
    """How the eval loss moved between ``since`` and ``step``: "falling" or "rising" by more
    than ``rel`` of its level, "flat", or None with fewer than two evaluations to compare.

    The earliest evaluation at or after ``since`` (or the last one before it) is compared with
    the latest one at or before ``step``."""
    upto = [(s, v) for s, v in evals if s <= step]
    if len(upto) < 2:
        return None
    before = [(s, v) for s, v in upto if s <= since]
    first = before[-1] if before else upto[0]
    last = upto[-1]
    if last[0] <= first[0]:
        return None
    scale = max(abs(first[1]), 1e-12)
    if last[1] < first[1] - rel * scale:
        return "falling"
    if last[1] > first[1] + rel * scale:
        return "rising"
    return "flat"


def _as_info(finding: Finding, note: str, confidence: str, support: list[str]) -> Finding:
    finding.severity = Severity.INFO
    finding.message = f"{finding.message} {note}"
    finding.evidence["confidence"] = confidence
    finding.evidence["support"] = support
    return finding


def judge_plateau(finding: Finding, refs: References, evals: list[tuple[int, float]],
                  tolerance: float) -> Finding:
    """Weigh an early-convergence finding against the references and the eval loss."""
    ev = finding.evidence
    level = float(ev.get("level", float("nan")))
    support = list(ev.get("support") or ["training loss shape"])  # what the detector itself rests it on
    trend = eval_trend(evals, finding.onset_step, finding.step)
    if trend == "falling":
        return _as_info(finding, "But the eval loss is still falling since the onset: the model is still learning, "
                        "so this is not acted on.", "contradicted", support + ["eval loss falling"])
    at = (ev["reference"], ev["reference_level"]) if ev.get("rule") == "reference" else refs.nearest(level, tolerance)
    if at is not None:
        name, ref = at
        ev["reference"], ev["reference_level"], ev["reference_tolerance"] = name, ref, tolerance
        support.append(f"{name} level")
        if trend is not None:
            support.append(f"eval loss {trend}")
        if ev.get("rule") != "reference":
            finding.message += (f" It sits at {100 * level / ref:.0f}% of the {name} level {fmt(ref)}: "
                                "the model has learned little from its inputs.")
        ev["confidence"] = "corroborated"
        ev["support"] = support
        return finding
    if refs.known:
        name, ref = min(refs.levels.items(), key=lambda kv: kv[1])
        return _as_info(
            finding,
            f"Shape only: the loss is at {100 * level / ref:.0f}% of the {name} level {fmt(ref)}, so the model has "
            "learned from its inputs; a flat stretch there is most likely convergence. Not acted on; "
            "check the eval loss before stopping.", "shape_only", support)
    return _as_info(
        finding,
        "Shape only: no reference level (vocabulary, label tokens) was available to tell a premature "
        "plateau from convergence; not acted on.", "shape_only", support)


def eval_rise(evals: list[tuple[int, float]], since: int, step: int, rel: float = 0.01) -> str | None:
    """Whether the eval loss at ``step`` is above its best up to ``since`` (or its first value
    when there is none by then) by more than ``rel``: "rising", else "flat"; None with fewer than
    two evaluations by ``step``."""
    upto = [(s, v) for s, v in evals if s <= step]
    if len(upto) < 2:
        return None
    before = [v for s, v in upto[:-1] if s <= since] or [upto[0][1]]
    best = min(before)
    return "rising" if upto[-1][1] > best + rel * max(abs(best), 1e-12) else "flat"


def judge_divergence(finding: Finding, evals: list[tuple[int, float]]) -> Finding:
    """A training-loss climb that the eval loss does not share is reported, not acted on."""
    trend = eval_rise(evals, finding.onset_step, finding.step)
    if trend == "flat":
        return _as_info(finding, "But the eval loss has not risen above its best before the onset: not acted on.",
                        "contradicted", ["training loss shape", f"eval loss {trend}"])
    if trend == "rising":
        finding.evidence["support"] = ["training loss shape", "eval loss rising"]
        finding.evidence["confidence"] = "corroborated"
    return finding


class EvidenceStage:
    """The post-detection stage that applies ``judge_plateau`` and ``judge_divergence``."""

    name = "evidence"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.references = References()
        self.evals: list[tuple[int, float]] = []

    def observe_eval(self, step: int, loss: float) -> None:
        """An evaluation's loss at ``step`` (in step order; a repeated step replaces the last)."""
        if self.evals and self.evals[-1][0] >= step:
            self.evals = [(s, v) for s, v in self.evals if s < step]
        self.evals.append((int(step), float(loss)))
        del self.evals[:-_MAX_EVALS]

    def review(self, findings: list[Finding], step: int) -> list[Finding]:
        for f in findings:
            if f.reason is Reason.EARLY_CONVERGENCE and f.severity is not Severity.INFO:
                judge_plateau(f, self.references, self.evals, self.config.reference_tolerance)
            elif f.reason is Reason.DIVERGENCE and f.severity is not Severity.INFO:
                judge_divergence(f, self.evals)
        return findings

    def reset_after_rollback(self, step: int) -> None:
        # evaluations of the abandoned branch say nothing about the new one
        self.evals = [(s, v) for s, v in self.evals if s <= step]

    def state_dict(self) -> dict[str, Any]:
        return {"evals": [list(e) for e in self.evals]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evals = [(int(s), float(v)) for s, v in state.get("evals", [])]
