"""All detectors over one stream of samples: the single code path for online and offline use.

A detector joins the suite by one entry in ``DETECTORS``; a stage that weighs findings against
further evidence, by one entry in ``STAGES``. The suite calls them all the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lossguard.config import DetectionConfig
from lossguard.records import Columns, Finding, Reason, Sample, Severity
from lossguard.signals.base import Detector, Stage
from lossguard.signals.climb import ClimbDetector
from lossguard.signals.degenerate import DegenerateLossDetector
from lossguard.signals.divergence import DivergenceDetector
from lossguard.signals.evidence import EvidenceStage
from lossguard.signals.gradients import GradientDetector
from lossguard.signals.lr_too_high import LRTooHighStage
from lossguard.signals.nonfinite import NonfiniteDetector
from lossguard.signals.plateau import PlateauDetector
from lossguard.signals.preference import PreferenceLevelDetector
from lossguard.signals.references import References
from lossguard.signals.spike import GradExplosionDetector, SpikeDetector

# reasons whose detector already reports once per episode; a cooldown would only hide a new one
_EPISODIC = frozenset({Reason.NONFINITE, Reason.EARLY_CONVERGENCE, Reason.NOT_A_CONVERGENCE_SIGNAL,
                       Reason.ZERO_LOSS, Reason.GRAD_VANISHING, Reason.LR_TOO_HIGH})
_CONVERGENCE = frozenset({Reason.EARLY_CONVERGENCE, Reason.DIVERGENCE})
# what an RL or preference loss does by nature (a TD loss jumps 100x, a GRPO loss is 0 until the
# KL term grows): reported as info on such a run, never a warning and never a rollback
_NATURAL_FOR_RL = frozenset({Reason.SPIKE, Reason.ZERO_LOSS})


@dataclass(frozen=True)
class RunPlan:
    """How long the run is planned to be: what "early" is measured against."""

    max_steps: int | None = None
    num_train_epochs: float | None = None


@dataclass(frozen=True)
class Registration:
    """One detector of the suite.

    Args:
        build: makes the detector from the thresholds and the run's plan.
        reads_convergence: it reads the loss as a convergence signal (a trend, a plateau), so it
            is skipped, and its findings dropped, once the loss is recognised as not one (an RL
            or preference loss: the ``degenerate`` detector).
    """

    build: Callable[[DetectionConfig, RunPlan], Detector]
    reads_convergence: bool = False


# in the order their findings of one step are reported (the convergence readers after the others)
DETECTORS: tuple[Registration, ...] = (
    Registration(lambda c, plan: NonfiniteDetector()),
    Registration(lambda c, plan: DegenerateLossDetector(c)),
    Registration(lambda c, plan: PreferenceLevelDetector(c)),
    Registration(lambda c, plan: GradientDetector(c)),
    Registration(lambda c, plan: SpikeDetector(c)),
    Registration(lambda c, plan: GradExplosionDetector(c)),
    Registration(lambda c, plan: DivergenceDetector(c), reads_convergence=True),
    Registration(lambda c, plan: ClimbDetector(c), reads_convergence=True),
    Registration(lambda c, plan: PlateauDetector(c, max_steps=plan.max_steps, num_train_epochs=plan.num_train_epochs),
                 reads_convergence=True),
)

# run in this order over each step's findings, before the cooldown
STAGES: tuple[Callable[[DetectionConfig, RunPlan], Stage], ...] = (
    lambda c, plan: LRTooHighStage(c),
    lambda c, plan: EvidenceStage(c),
)


class DetectorSuite:
    """Feeds each sample to every detector and returns the findings worth reporting now.

    One ongoing problem gives one finding: detectors report at the start of an episode, and
    spikes, gradient explosions and divergence of the same kind within ``cooldown_steps`` of
    the previous report are folded into it. Once the loss is recognised as not a convergence
    signal (RL/preference losses), plateau and divergence findings are dropped.

    Args:
        config: thresholds; ``DetectionConfig()`` when omitted.
        max_steps: planned optimizer steps (what "early" is measured against).
        num_train_epochs: planned epochs, used for progress when ``max_steps`` is unknown.
    """

    def __init__(
        self,
        config: DetectionConfig | None = None,
        *,
        max_steps: int | None = None,
        num_train_epochs: float | None = None,
    ) -> None:
        self.config = config or DetectionConfig()
        plan = RunPlan(max_steps, num_train_epochs)
        built = [(reg.build(self.config, plan), reg.reads_convergence) for reg in DETECTORS]
        # the convergence readers run after the others, which decide whether they run at all
        self._plain = [det for det, reads in built if not reads]
        self._readers = [det for det, reads in built if reads]
        self.detectors: list[Detector] = self._plain + self._readers
        self._by_name = {det.name: det for det in self.detectors}
        self.stages: list[Stage] = [build(self.config, plan) for build in STAGES]
        # the detector that tells whether the loss is a convergence signal at all
        self.degenerate: DegenerateLossDetector = self._by_name["degenerate"]  # type: ignore[assignment]
        self.plateau: PlateauDetector = self._by_name["plateau"]  # type: ignore[assignment]
        self.last_reported: dict[str, int] = {}
        self.samples_seen = 0
        self.last_step: int | None = None

    def __getattr__(self, name: str) -> Any:
        """A detector by its name (``suite.spike``)."""
        by_name = self.__dict__.get("_by_name", {})
        if name in by_name:
            return by_name[name]
        raise AttributeError(name)

    @property
    def max_steps(self) -> int | None:
        return self.plateau.max_steps

    def set_progress(self, *, max_steps: int | None = None, num_train_epochs: float | None = None) -> None:
        """Tell the suite how long the run is planned to be (values that are None are kept)."""
        if max_steps is not None and max_steps > 0:
            self.plateau.max_steps = int(max_steps)
        if num_train_epochs is not None and math.isfinite(num_train_epochs) and num_train_epochs > 0:
            self.plateau.num_train_epochs = float(num_train_epochs)

    def set_references(self, references: References) -> None:
        """The levels and objective the run's loss is judged against (``references.py``): given
        to every detector and stage that reads them."""
        for part in [*self.detectors, *self.stages]:
            if hasattr(part, "references"):
                part.references = references

    def observe_eval(self, step: int, loss: float) -> None:
        """An evaluation loss, for the stages that weigh findings against it."""
        if not math.isfinite(loss):
            return
        for stage in self.stages:
            hook = getattr(stage, "observe_eval", None)
            if hook is not None:
                hook(step, loss)

    def observe(self, sample: Sample) -> list[Finding]:
        """Run every detector on one sample (samples must come in step order)."""
        self.samples_seen += 1
        self.last_step = sample.step
        out: list[Finding] = []
        for det in self._plain:
            f = det.update(sample)
            if f is not None:
                out.append(f)
        if not self.degenerate.active:
            for det in self._readers:
                f = det.update(sample)
                if f is not None:
                    out.append(f)
        if not out:
            return out
        return self._report(out, sample.step)

    def observe_many(self, columns: Columns) -> list[Finding]:
        """``observe`` over a whole stretch of samples at once, for offline analysis.

        Returns exactly the findings that feeding the samples one by one through ``observe``
        would, and leaves the suite in the state that would leave (each detector's batch path
        shares its thresholds and decisions with its streaming one).
        """
        if len(columns) == 0:
            return []
        # a damaged log can hold values near 1e308: their infinities are handled, not worth a warning
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._observe_many(columns)

    def _observe_many(self, columns: Columns) -> list[Finding]:
        n = len(columns)
        st = columns.steps
        found: list[tuple[int, int, Finding]] = []
        degenerate = self.degenerate
        was_active = degenerate.active
        cut = 0 if was_active else n  # the rows a convergence reader sees: up to the loss found degenerate
        for order, det in enumerate(self._plain):
            pairs = det.update_many(columns)
            if det is degenerate and pairs and degenerate.active and not was_active:
                cut = pairs[0][0]
            found.extend((i, order, f) for i, f in pairs)
        if cut > 0:
            for order, det in enumerate(self._readers, len(self._plain)):
                pairs = det.update_many(columns if cut == n else columns[:cut])
                found.extend((i, order, f) for i, f in pairs)
        found.sort(key=lambda t: (t[0], t[1]))
        out: list[Finding] = []
        k = 0
        while k < len(found):
            i = found[k][0]
            group = []
            while k < len(found) and found[k][0] == i:
                group.append(found[k][2])
                k += 1
            out.extend(self._report(group, int(st[i])))
        self.samples_seen += n
        self.last_step = int(st[-1])
        return out

    def _report(self, findings: list[Finding], step: int) -> list[Finding]:
        """One step's findings through the stages, then the cooldown."""
        for stage in self.stages:
            findings = stage.review(findings, step)
        return self._gate(findings, step)

    def _gate(self, findings: list[Finding], step: int) -> list[Finding]:
        kept = []
        cooldown = self.config.cooldown_steps
        for f in findings:
            # a preference loss read against its own level (``preference.py``) is not a convergence reading
            if self.degenerate.active and f.reason in _CONVERGENCE and f.detector != "preference":
                continue
            key = f.reason.value
            last = self.last_reported.get(key)
            self.last_reported[key] = step
            # a cluster (spikes every few dozen steps) is one episode: the cooldown runs from the last one
            if f.reason not in _EPISODIC and last is not None and 0 <= step - last <= cooldown:
                continue
            if self.degenerate.active and f.reason in _NATURAL_FOR_RL and f.severity is not Severity.INFO:
                f.severity = Severity.INFO
                f.message += (" The loss is not a convergence signal here (an RL or preference objective, or "
                              "negative values): its spikes and zeros are reported, not acted on.")
                f.evidence["confidence"] = "shape_only"
                f.evidence["support"] = ["training loss shape", "not a convergence signal"]
            kept.append(f)
        return kept

    def reset_after_rollback(self, step: int) -> None:
        """After recovery restored the detectors' state, forget the streaks of the abandoned branch.

        Call it after ``load_state_dict``: the next sample's step number will jump past the
        snapshot (the data loader keeps moving), so trend windows and the plateau segment
        restart instead of bridging the gap; robust baselines are kept.
        """
        for det in self.detectors:
            det.reset_after_rollback(step)
        for stage in self.stages:
            stage.reset_after_rollback(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "detectors": {d.name: d.state_dict() for d in self.detectors},
            "stages": {s.name: s.state_dict() for s in self.stages},
            "last_reported": dict(self.last_reported),
            "samples_seen": self.samples_seen,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for d in self.detectors:
            if d.name in state["detectors"]:
                d.load_state_dict(state["detectors"][d.name])
        stages = state.get("stages", {})
        for s in self.stages:
            if s.name in stages:
                s.load_state_dict(stages[s.name])
        self.last_reported = {str(k): int(v) for k, v in state["last_reported"].items()}
        self.samples_seen = int(state["samples_seen"])
        self.last_step = state["last_step"]
