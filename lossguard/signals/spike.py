"""Loss spikes and gradient-norm explosions against a robust rolling baseline."""

from __future__ import annotations

import math
from typing import Any

from lossguard.config import DetectionConfig
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import fmt
from lossguard.signals.stats import RollingRobust

_TINY = 1e-12
_BASELINE = 16
# the noise of one value, from the spread of differences of neighbours (trend cancels out)
_DIFF_TO_SIGMA = 1.0 / 1.4142135623730951


class SpikeDetector:
    """A loss (or grad norm) far above the recent baseline: a bad batch or the start of a blow-up.

    The baseline is the median of the last 16 values, the current one excluded (short, so a
    falling curve does not leave it behind), and the yardstick is the robust sigma (IQR / 1.349)
    of the last ``spike_window`` step-to-step differences divided by sqrt(2): the noise of one
    value with the trend cancelled out, which the spikes being looked for cannot widen. A loss spike must also be a material rise
    (``spike_min_rise`` of the baseline); grad norms are judged on a log scale (they vary by
    factors, not by offsets) and must be ``grad_spike_ratio`` times the baseline (see
    ``GradExplosionDetector``). One finding per run of consecutive spiking samples;
    ``spike_score`` is the share of samples that spiked.
    """

    name = "spike"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        c = self.config
        self.loss_window = RollingRobust(_BASELINE)
        self.diffs = RollingRobust(c.spike_window)
        self.prev: float | None = None
        self.in_loss_spike = False
        self.n = 0
        self.n_spikes = 0

    @property
    def spike_score(self) -> float:
        """Share of samples whose loss spiked (0 for a clean run)."""
        return self.n_spikes / self.n if self.n else 0.0

    def update(self, sample: Sample) -> Finding | None:
        loss = sample.loss
        if loss is None or not math.isfinite(loss):
            return None
        step = sample.step
        c = self.config
        w = self.loss_window
        self.n += 1
        finding = None
        d = self.diffs
        if len(d) >= c.min_history:
            med = w.median()
            scale = abs(med) + _TINY
            sigma = max(d.sigma() * _DIFF_TO_SIGMA, 1e-3 * scale)
            threshold = med + max(c.spike_sigmas * sigma, c.spike_min_rise * scale)
            if loss > threshold:
                self.n_spikes += 1
                if not self.in_loss_spike:
                    self.in_loss_spike = True
                    finding = Finding(
                        reason=Reason.SPIKE,
                        severity=Severity.WARNING,
                        step=step,
                        onset_step=step,
                        message=(
                            f"Loss spike at step {step}: {fmt(loss)} > {fmt(threshold)} "
                            f"(median {fmt(med)} of the last {len(w)} samples + {c.spike_sigmas:g} "
                            f"sigma of {fmt(sigma)})."
                        ),
                        evidence={
                            "loss": loss, "median": med, "sigma": sigma, "threshold": threshold,
                            "spike_score": self.spike_score,
                        },
                        detector=self.name,
                    )
            else:
                self.in_loss_spike = False
        if self.prev is not None:
            d.push(loss - self.prev)
        self.prev = loss
        w.push(loss)
        return finding

    def reset_after_rollback(self, step: int) -> None:
        self.in_loss_spike = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_window": self.loss_window.state_dict(),
            "diffs": self.diffs.state_dict(),
            "prev": self.prev,
            "in_loss_spike": self.in_loss_spike,
            "n": self.n,
            "n_spikes": self.n_spikes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_window.load_state_dict(state["loss_window"])
        self.diffs.load_state_dict(state["diffs"])
        self.prev = state["prev"]
        self.in_loss_spike = bool(state["in_loss_spike"])
        self.n = int(state["n"])
        self.n_spikes = int(state["n_spikes"])


class GradExplosionDetector:
    """A gradient norm many times its recent median: the update about to be applied is huge.

    Judged on log(grad norm) against the median and robust sigma of the last ``spike_window``
    values (current excluded); it must also exceed ``grad_spike_ratio`` times the median.
    Clipping hides the damage from the loss for a while, so this often fires first.
    """

    name = "grad_explosion"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.grad_window = RollingRobust(self.config.spike_window)
        self.in_grad_spike = False

    def update(self, sample: Sample) -> Finding | None:
        gn = sample.grad_norm
        if gn is None or not math.isfinite(gn) or gn <= 0.0:
            return None
        step, loss = sample.step, sample.loss
        c = self.config
        w = self.grad_window
        lg = math.log(gn)
        finding = None
        if len(w) >= c.min_history:
            med = w.median()
            sigma = max(w.sigma(), 0.05)
            threshold = med + max(c.spike_sigmas * sigma, math.log(c.grad_spike_ratio))
            if lg > threshold:
                if not self.in_grad_spike:
                    self.in_grad_spike = True
                    base = math.exp(med)
                    finding = Finding(
                        reason=Reason.GRAD_EXPLOSION,
                        severity=Severity.WARNING,
                        step=step,
                        onset_step=step,
                        message=(
                            f"Gradient norm explosion at step {step}: {fmt(gn)} is "
                            f"{gn / base:.1f}x the median {fmt(base)} of the last {len(w)} samples "
                            f"(threshold {fmt(math.exp(threshold))})."
                        ),
                        evidence={"grad_norm": gn, "median": base, "threshold": math.exp(threshold),
                                  "loss": loss},
                        detector=self.name,
                    )
            else:
                self.in_grad_spike = False
        w.push(lg)
        return finding

    def reset_after_rollback(self, step: int) -> None:
        self.in_grad_spike = False

    def state_dict(self) -> dict[str, Any]:
        return {"grad_window": self.grad_window.state_dict(), "in_grad_spike": self.in_grad_spike}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grad_window.load_state_dict(state["grad_window"])
        self.in_grad_spike = bool(state["in_grad_spike"])
