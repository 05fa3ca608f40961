"""All detectors over one stream of samples: the single code path for online and offline use."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

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

    def observe_many(
        self,
        steps: Any,
        losses: Any,
        grad_norms: Any = None,
        lrs: Any = None,
        epochs: Any = None,
        *,
        has_loss: Any = None,
        has_grad_norm: Any = None,
    ) -> list[Finding]:
        """``observe`` over a whole stretch of samples at once, for offline analysis.

        Returns exactly the findings that feeding the samples one by one through ``observe``
        would, and leaves the suite in the state that would leave (each detector's vectorised
        path shares its thresholds and decisions with its streaming one). Arrays are in step
        order; a missing value is NaN, and ``has_loss`` / ``has_grad_norm`` tell a missing value
        from a logged NaN (by default every loss is logged, and a grad norm is logged where it
        is not NaN).
        """
        st = np.asarray(steps, dtype=np.int64)
        n = len(st)
        if n == 0:
            return []
        # a damaged log can hold values near 1e308: their infinities are handled, not worth a warning
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._observe_many(st, losses, grad_norms, lrs, epochs, has_loss, has_grad_norm)

    def _observe_many(self, st: np.ndarray, losses: Any, grad_norms: Any, lrs: Any, epochs: Any,
                      has_loss: Any, has_grad_norm: Any) -> list[Finding]:
        n = len(st)

        def col(a: Any) -> np.ndarray:
            return np.full(n, np.nan) if a is None else np.asarray(a, dtype=float)

        loss, gn, lr, ep = col(losses), col(grad_norms), col(lrs), col(epochs)
        hl = np.ones(n, dtype=bool) if has_loss is None else np.asarray(has_loss, dtype=bool)
        hg = ~np.isnan(gn) if has_grad_norm is None else np.asarray(has_grad_norm, dtype=bool)
        found: list[tuple[int, int, Finding]] = []

        def add(order: int, pairs: list[tuple[int, Finding]]) -> None:
            found.extend((i, order, f) for i, f in pairs)

        add(0, self.nonfinite.update_many(st, loss, gn, hl, hg))
        was_active = self.degenerate.active
        deg = self.degenerate.update_many(st, loss)
        add(1, deg)
        add(2, self.gradients.update_many(st, loss, gn, hl, hg))
        add(3, self.spike.update_many(st, loss))
        add(4, self.grad_explosion.update_many(st, gn, loss))
        cut = 0 if was_active else (deg[0][0] if deg and self.degenerate.active else n)
        if cut > 0:
            add(5, self.divergence.update_many(st[:cut], loss[:cut], lr[:cut]))
            add(6, self.plateau.update_many(st[:cut], loss[:cut], lr[:cut], ep[:cut]))
        found.sort(key=lambda t: (t[0], t[1]))
        out: list[Finding] = []
        k = 0
        while k < len(found):
            i = found[k][0]
            group = []
            while k < len(found) and found[k][0] == i:
                group.append(found[k][2])
                k += 1
            out.extend(self._gate(group, int(st[i])))
        self.samples_seen += n
        self.last_step = int(st[-1])
        return out

    def _gate(self, findings: list[Finding], step: int) -> list[Finding]:
        kept = []
        cooldown = self.config.cooldown_steps
        for f in findings:
            if self.degenerate.active and f.reason in _CONVERGENCE:
                continue
            key = f.reason.value
            last = self.last_reported.get(key)
            self.last_reported[key] = step
            # a cluster (spikes every few dozen steps) is one episode: the cooldown runs from the last one
            if f.reason not in _EPISODIC and last is not None and 0 <= step - last <= cooldown:
                continue
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
