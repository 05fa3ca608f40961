"""The framework-free engine: sample -> detectors -> findings -> recovery policy -> actions.

Integrations (the Trainer callback, the plain-loop guard) gather a ``Sample`` per optimizer step
and hand it here; the engine decides, they act. Nothing here imports torch.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Sequence
from typing import Any

from lossguard.config import GuardConfig
from lossguard.records import Finding, ProbeVerdict, Reason, Sample
from lossguard.recovery.policy import Decision, RecoveryPolicy
from lossguard.recovery.verdict import Scores
from lossguard.signals.base import Suite
from lossguard.signals.references import References


class Guard:
    """Runs every detector over each step's sample and decides what recovery should do.

    Args:
        config: the whole ``GuardConfig`` (detection and recovery sections are used here).
        max_steps, num_train_epochs: the run's length, which tells a premature plateau from
            convergence.
        detectors: a ``signals.base.Suite``; the built-in ``DetectorSuite`` by default.
    """

    def __init__(
        self,
        config: GuardConfig | None = None,
        *,
        max_steps: int | None = None,
        num_train_epochs: float | None = None,
        detectors: Suite | None = None,
    ) -> None:
        self.config = config or GuardConfig()
        if detectors is None:
            from lossguard.signals.suite import DetectorSuite

            detectors = DetectorSuite(
                self.config.detection, max_steps=max_steps, num_train_epochs=num_train_epochs
            )
        self.detectors: Suite = detectors
        self.batch_steps = self.config.detection.batch_steps
        self.policy = RecoveryPolicy(self.config.recovery, lookback=self.batch_steps)
        self.findings: list[Finding] = []
        self.pending: list[Sample] = []  # samples the detectors have not seen yet (``decide``)

    def set_references(self, references: References) -> None:
        """The no-learning levels and the objective of this run (``signals/references.py``):
        the evidence a plateau is weighed against. A suite without the hook ignores them."""
        hook = getattr(self.detectors, "set_references", None)
        if hook is not None:
            hook(references)

    def observe_eval(self, step: int, loss: float) -> None:
        """An evaluation loss at ``step``: a still-falling eval loss contradicts a plateau."""
        hook = getattr(self.detectors, "observe_eval", None)
        if hook is not None:
            hook(step, loss)

    def observe(self, sample: Sample) -> list[Finding]:
        """Findings raised by this step's sample (usually none), and by any held back before it;
        detection only."""
        self.pending.append(sample)
        return self.flush()

    def flush(self) -> list[Finding]:
        """Run the detectors over the samples ``decide`` held back, in step order; their findings."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        found: list[Finding] = []
        for sample in pending:
            found.extend(self.detectors.observe(sample))
        self.findings.extend(found)
        return found

    def decide(self, sample: Sample, snapshots: Sequence[int] = (),
               probe: Callable[[Finding], dict[str, Any] | None] | None = None, *,
               flush: bool = False, judge: Callable[[], Scores | None] | None = None) -> Decision:
        """Detection and recovery for one step; ``snapshots`` are the steps a rollback can return to.

        The detectors run over the samples of up to ``detection.batch_steps`` steps at once:
        after a training step has filled the caches, running them for ten samples at a time
        costs less than half of running them at every step (docs/benchmarks.md). They run at
        every multiple of ``batch_steps``,
        at once on a non-finite loss or grad norm, at every step while a recovery is in
        progress, and when ``flush`` is set: pass it when a snapshot will be taken after this
        step, so that the snapshot holds detector memory up to its own step. Each finding keeps
        the step it names, and the policy decides it as it would have at that step; what is
        late is only the moment of acting (by at most ``batch_steps - 1`` steps). Every input
        of that rule is the same on all DDP ranks.

        ``probe``, when given, is asked for a Hessian verdict on each premature plateau before
        the policy sees it; the verdict is added to the finding, and with
        ``recovery.plateau_needs_saddle`` a plateau the probe calls a minimum triggers nothing.
        The decision's ``findings`` hold the detectors' and the policy's own (relapse, gave up).

        ``judge`` scores the model as it is now on the safety net's evaluation batches (None when
        it cannot): called when a trial's verdict is due, and when a rollback keeps its head.
        Without it, rollbacks are not judged.
        """
        self.pending.append(sample)
        found = self.flush() if flush or self._due(sample) else []
        triggers = list(found)
        if probe is not None and self.config.probe.on_plateau:
            for finding in found:
                if finding.reason is Reason.EARLY_CONVERGENCE:
                    verdict = _attach_verdict(finding, probe(finding))
                    if self.config.recovery.plateau_needs_saddle and verdict in _NO_SADDLE:
                        triggers.remove(finding)
        judged = None
        if judge is not None and self.policy.verdict_due(sample.step):
            judged = judge()
            if judged is None:
                unjudged = self.policy.unjudged(sample.step, "the recovered branch could not be scored")
                decision = self.policy.step(sample.step, sample.loss, triggers, snapshots)
                decision.actions[:0] = unjudged.actions
                decision.drop_head = True
                return self._with_findings(decision, found)
        decision = self.policy.step(sample.step, sample.loss, triggers, snapshots, judged=judged)
        if decision.keep_head:
            self.policy.head_scored(decision, judge() if judge is not None else None)
        return self._with_findings(decision, found)

    def conclude(self, step: int, judge: Callable[[], Scores | None] | None) -> Decision:
        """At train end: a rollback still on trial is judged on the branch as it ends (see
        ``RecoveryPolicy.conclude``)."""
        if not self.policy.judging or judge is None:
            return Decision()
        scores = judge()
        if scores is None:
            return self.policy.unjudged(step, "the recovered branch could not be scored")
        return self.policy.conclude(step, scores)

    def _with_findings(self, decision: Decision, found: list[Finding]) -> Decision:
        self.findings.extend(decision.findings)
        decision.findings = found + decision.findings
        return decision

    def _due(self, sample: Sample) -> bool:
        return (sample.step % self.batch_steps == 0 or len(self.pending) >= self.batch_steps
                or not _finite(sample.loss) or not _finite(sample.grad_norm)
                or not self.policy.idle(sample.step))

    def lr_multiplier(self, step: int) -> float:
        """The factor on the scheduled LR for the optimizer step that will produce sample ``step``."""
        return self.policy.lr_multiplier(step)

    def detector_state(self) -> dict[str, Any]:
        """A copy of the detectors' memory, to be snapshotted with the weights."""
        frozen = self.frozen_detector_state()
        return _unfreeze(frozen) if isinstance(frozen, bytes) else frozen

    def frozen_detector_state(self) -> bytes | dict[str, Any]:
        """A private copy of the detectors' memory, taken with every snapshot: pickled (far cheaper
        than ``deepcopy``), or deep-copied for state that pickle refuses."""
        state = self.detectors.state_dict()
        try:
            return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return copy.deepcopy(state)

    def load_detector_state(self, state: dict[str, Any] | bytes, step: int = 0) -> None:
        """After a rollback to the snapshot of ``step``: put back detector memory from
        ``detector_state`` or ``frozen_detector_state`` (taken where ``decide`` had flushed, so no
        held-back sample is left), then let the detectors forget the streaks of the abandoned
        branch (``reset_after_rollback``): the next sample's step jumps past the snapshot, and
        trend windows restart instead of bridging the gap."""
        self.detectors.load_state_dict(_unfreeze(state) if isinstance(state, bytes) else copy.deepcopy(state))
        self.pending = []
        self.detectors.reset_after_rollback(step)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, JSON-ready: a checkpoint may fall between two batches,
        so the samples not yet analysed go with it."""
        return {"detectors": self.detectors.state_dict(), "policy": self.policy.state_dict(),
                "pending": [s.to_record() for s in self.pending], "n_findings": len(self.findings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detectors.load_state_dict(state["detectors"])
        if "policy" in state:
            self.policy.load_state_dict(state["policy"])
        self.pending = [Sample.from_record(r) for r in state.get("pending", [])]


# a plateau the probe sees no way down from: with plateau_needs_saddle it triggers nothing
_NO_SADDLE = frozenset({ProbeVerdict.MINIMUM, ProbeVerdict.DEGENERATE})


def _finite(value: float | None) -> bool:
    """A missing value is not a non-finite one (``x - x`` is 0 for finite floats and ints, NaN otherwise:
    cheaper than a call into ``math`` at every step)."""
    return value is None or value - value == 0


def _unfreeze(blob: bytes) -> dict[str, Any]:
    # only ever bytes that frozen_detector_state pickled in this process or a snapshot it wrote
    return pickle.loads(blob)  # noqa: S301


def _attach_verdict(finding: Finding, record: dict[str, Any] | None) -> ProbeVerdict | None:
    """Put a probe's verdict into the plateau finding's evidence and message; the verdict."""
    if not record or record.get("skipped"):
        if record:
            finding.evidence["probe"] = {"skipped": record.get("reason")}
        return None
    try:
        verdict: ProbeVerdict | None = ProbeVerdict(record.get("verdict"))
    except ValueError:
        verdict = None
    finding.evidence["probe"] = {k: record.get(k) for k in ("verdict", "ratio", "lambda_max", "lambda_min")}
    ratio = record.get("ratio")
    why = record.get("message")
    if verdict is ProbeVerdict.INCONCLUSIVE and isinstance(why, str) and why.startswith("inconclusive"):
        # the first group's ratio alone can read as a minimum; the probe's own sentence says why not
        finding.message += f" Hessian probe: {why.rstrip('.')}."
        return verdict
    ratio_text = f"{ratio:.3g}" if isinstance(ratio, (int, float)) else "n/a"
    finding.message += f" Hessian probe: {record.get('verdict')} (lambda_min/lambda_max = {ratio_text})."
    return verdict
