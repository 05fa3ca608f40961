"""All detectors over one stream of samples: the single code path for online and offline use."""

from __future__ import annotations

import math
from typing import Any

from lossguard.config import DetectionConfig
from lossguard.records import Finding, Reason, Sample
from lossguard.signals.degenerate import DegenerateLossDetector
from lossguard.signals.divergence import DivergenceDetector
from lossguard.signals.gradients import GradientDetector
from lossguard.signals.nonfinite import NonfiniteDetector
from lossguard.signals.plateau import PlateauDetector
from lossguard.signals.spike import GradExplosionDetector, SpikeDetector

# reasons whose detector already reports once per episode; a cooldown would only hide a new one
_EPISODIC = frozenset({Reason.NONFINITE, Reason.EARLY_CONVERGENCE, Reason.NOT_A_CONVERGENCE_SIGNAL,
                       Reason.ZERO_LOSS, Reason.GRAD_VANISHING})
_CONVERGENCE = frozenset({Reason.EARLY_CONVERGENCE, Reason.DIVERGENCE})


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
        c = self.config
        self.nonfinite = NonfiniteDetector()
        self.spike = SpikeDetector(c)
        self.grad_explosion = GradExplosionDetector(c)
        self.divergence = DivergenceDetector(c)
        self.plateau = PlateauDetector(c, max_steps=max_steps, num_train_epochs=num_train_epochs)
        self.gradients = GradientDetector(c)
        self.degenerate = DegenerateLossDetector(c)
        self.detectors = [
            self.nonfinite, self.degenerate, self.gradients, self.spike, self.grad_explosion,
            self.divergence, self.plateau,
        ]
        self.last_reported: dict[str, int] = {}
        self.samples_seen = 0
        self.last_step: int | None = None

    @property
    def max_steps(self) -> int | None:
        return self.plateau.max_steps

    def set_progress(self, *, max_steps: int | None = None, num_train_epochs: float | None = None) -> None:
        """Tell the suite how long the run is planned to be (values that are None are kept)."""
        if max_steps is not None and max_steps > 0:
            self.plateau.max_steps = int(max_steps)
        if num_train_epochs is not None and math.isfinite(num_train_epochs) and num_train_epochs > 0:
            self.plateau.num_train_epochs = float(num_train_epochs)

    def observe(self, sample: Sample) -> list[Finding]:
        """Run every detector on one sample (samples must come in step order)."""
        self.samples_seen += 1
        self.last_step = sample.step
        out: list[Finding] = []
        nf = self.nonfinite.update(sample)
        if nf is not None:
            out.append(nf)
        for det in (self.degenerate, self.gradients, self.spike, self.grad_explosion):
            f = det.update(sample)
            if f is not None:
                out.append(f)
        if not self.degenerate.active:
            for det in (self.divergence, self.plateau):
                f = det.update(sample)
                if f is not None:
                    out.append(f)
        if not out:
            return out
        return self._gate(out, sample.step)

    def _gate(self, findings: list[Finding], step: int) -> list[Finding]:
        kept = []
        cooldown = self.config.cooldown_steps
        for f in findings:
            if self.degenerate.active and f.reason in _CONVERGENCE:
                continue
            key = f.reason.value
            last = self.last_reported.get(key)
            if f.reason not in _EPISODIC and last is not None and 0 <= step - last < cooldown:
                continue
            self.last_reported[key] = step
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

    def state_dict(self) -> dict[str, Any]:
        return {
            "detectors": {d.name: d.state_dict() for d in self.detectors},
            "last_reported": dict(self.last_reported),
            "samples_seen": self.samples_seen,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for d in self.detectors:
            if d.name in state["detectors"]:
                d.load_state_dict(state["detectors"][d.name])
        self.last_reported = {str(k): int(v) for k, v in state["last_reported"].items()}
        self.samples_seen = int(state["samples_seen"])
        self.last_step = state["last_step"]
