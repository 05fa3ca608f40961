"""The rules people use instead of lossguard, re-implemented to run over the same curves.

Each rule is a small class fed one logged value at a time, ``update(step, loss, grad_norm)``,
that returns the ``Alarm`` it would raise at that value (or ``None``): an early stop, an LR cut,
a skipped step, a warning. ``replay`` runs a rule over a whole log and stops where the rule
would stop training. Every rule was read in its own source first; the docstrings name the
repository, file and version read, and the facts taken from it (defaults, comparisons, the
order of checks). The code is this project's own.

How the rules are applied here, the same for all of them:

- **One logged value is one step of the rule.** A rule written for evaluations (transformers'
  and Lightning's early stopping) or for every optimizer step (KillLossSpike, OLMo-core,
  Megatron, dlib) sees the training loss as it was logged, one value at a time, as it would
  over a ``trainer_state.json``. Windows and patiences therefore count logged values.
- **The training loss is the monitored quantity**, and a lower loss is better ("min" mode).
- **Each alarm names the reasons it stands for** in lossguard's vocabulary (``Reason``), and
  ``cause`` keeps the rule's own name for it (``PATIENCE_EXHAUSTED``, ``LossSpikeError``).
  An alarm may stand for two reasons (KillLossSpike's "loss spike" is also how a run blowing
  up looks to it); an alarm that stands for none (Lightning's ``stopping_threshold``, a target
  reached) is kept but counts for no reason.

stdlib and numpy only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lossguard.records import Reason

EC, SPIKE, DIV, NONFINITE = Reason.EARLY_CONVERGENCE, Reason.SPIKE, Reason.DIVERGENCE, Reason.NONFINITE


@dataclass(frozen=True)
class Alarm:
    """What a rule did at one logged value: ``step``, the reasons it stands for, the rule's own
    name for it, and whether the rule stops training there."""

    step: int
    reasons: frozenset[Reason]
    cause: str
    stops: bool = False


class PeerRule(Protocol):
    """A rule over a stream of logged values."""

    name: str
    reasons: frozenset[Reason]  # every reason its alarms can stand for

    def update(self, step: int, loss: float, grad_norm: float | None) -> Alarm | None: ...


def replay(rule: PeerRule, steps: Sequence[int], losses: Sequence[float],
           grad_norms: Sequence[float | None] | None = None,
           has_grad_norm: Sequence[bool] | None = None) -> list[Alarm]:
    """Every alarm ``rule`` raises over a log, up to and including the one that stops training.

    A grad norm that was not logged is ``None`` (or False in ``has_grad_norm``); a logged NaN
    grad norm is a NaN. Rules with a batch path (``run_many``: the same alarms, computed over
    the whole log at once; the tests hold them equal) use it on a fresh rule when every value
    has a grad norm or none has.
    """
    gns: list[float | None] = [None] * len(steps)
    if grad_norms is not None:
        gns = [None if g is None or (has_grad_norm is not None and not has_grad_norm[i]) else float(g)
               for i, g in enumerate(grad_norms)]
    batch = getattr(rule, "run_many", None)
    logged = sum(g is not None for g in gns)
    if batch is not None and logged in (0, len(gns)):
        gn_array = np.array(gns, dtype=float) if logged else None
        return batch(np.asarray(steps), np.asarray(losses, dtype=float), gn_array)
    out: list[Alarm] = []
    for i, step in enumerate(steps):
        alarm = rule.update(int(step), float(losses[i]), gns[i])
        if alarm is not None:
            out.append(alarm)
            if alarm.stops:
                break
    return out


def _before(x: np.ndarray, w: int) -> np.ndarray:
    """Row ``i - w`` holds the ``w`` values before value ``i``, for every ``i >= w``."""
    return np.lib.stride_tricks.sliding_window_view(x[:-1], w) if len(x) > w else np.empty((0, w))


def _finite(x: float) -> bool:
    return math.isfinite(x)


class HFEarlyStopping:
    """transformers' ``EarlyStoppingCallback``, on the training loss instead of an eval metric.

    Source: huggingface/transformers v5.24.0 (the version this project pins, read from the
    installed package): ``src/transformers/trainer_callback.py`` (``EarlyStoppingCallback``,
    ``check_metric_value``, ``on_evaluate``) and ``src/transformers/trainer.py``
    (``_determine_best_metric``, which the Trainer calls after ``on_evaluate``).

    At each evaluation the callback compares the value with ``state.best_metric``, the best of
    the *earlier* evaluations (None at the first): the patience counter goes back to 0 when there
    is no best yet, or when the value is better than the best (``np.less``) by more than
    ``early_stopping_threshold`` (absolute); otherwise it goes up by one. Training stops when the
    counter reaches ``early_stopping_patience``. Afterwards the Trainer sets the best to the value
    when it is strictly better (the threshold plays no part there; the first best is +inf, so a
    NaN first value leaves it at +inf). Defaults: patience 1, threshold 0.0. A NaN value is
    never better: it counts against the patience.
    """

    name = "transformers EarlyStoppingCallback"
    reasons = frozenset({EC})

    def __init__(self, patience: int = 1, threshold: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience={patience!r} must be >= 1")
        self.patience = patience
        self.threshold = threshold
        self.best: float | None = None
        self.counter = 0

    def update(self, step: int, loss: float, grad_norm: float | None) -> Alarm | None:
        best = self.best
        if best is None or (loss < best and abs(loss - best) > self.threshold):
            self.counter = 0
        else:
            self.counter += 1
        stop = self.counter >= self.patience
        if best is None:
            best = math.inf
        if loss < best:
            best = loss
        self.best = best
        if stop:
            return Alarm(step, self.reasons, "early_stopping_patience", stops=True)
        return None


class TorchReduceLROnPlateau:
    """torch's ``ReduceLROnPlateau`` stepped with the training loss: an alarm where it cuts the LR.

    Source: pytorch/pytorch v2.13.0 (the version this project pins, read from the installed
    package), ``torch/optim/lr_scheduler.py``. Defaults: mode "min", factor 0.1, patience 10,
    threshold 1e-4 in "rel" mode (better means ``value < best * (1 - 1e-4)``), cooldown 0. A
    better value becomes the best and resets the count of bad values; any other value, NaN
    included, adds one; during a cooldown the count is held at 0. When the count exceeds the
    patience (the 11th bad value in a row at patience 10) the LR is cut, the cooldown starts
    and the count restarts at 0 (the best is kept). Training goes on: the rule can cut again.
    The LR floor (``min_lr``, ``eps``) is not modelled: every decision to cut is an alarm.
    """

    name = "torch ReduceLROnPlateau"
    reasons = frozenset({EC})

    def __init__(self, patience: int = 10, threshold: float = 1e-4, cooldown: int = 0) -> None:
        self.patience = patience
        self.threshold = threshold
        self.cooldown = cooldown
        self.best = math.inf
        self.bad = 0
        self.cooldown_left = 0

    def update(self, step: int, loss: float, grad_norm: float | None) -> Alarm | None:
        if loss < self.best * (1.0 - self.threshold):
            self.best = loss
            self.bad = 0
        else:
            self.bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad = 0
        if self.bad > self.patience:
            self.cooldown_left = self.cooldown
            self.bad = 0
            return Alarm(step, self.reasons, "reduce_lr")
        return None


class LightningEarlyStopping:
    """Lightning's ``EarlyStopping`` monitoring the training loss.

    Source: Lightning-AI/pytorch-lightning ``src/lightning/pytorch/callbacks/early_stopping.py``
    at commit 7f0c343 (2026-07-20, version 2.6.2). At each check, in this order: with
    ``check_finite`` (default True) a NaN/inf value stops training (``NON_FINITE_METRIC``); a
    value strictly below ``stopping_threshold`` stops it (``STOPPING_THRESHOLD``: a target
    reached, not an anomaly); a value strictly above ``divergence_threshold`` stops it
    (``DIVERGENCE_THRESHOLD``); a value that beats the best by more than ``min_delta``
    (``value + min_delta < best``) becomes the best and resets the wait count; otherwise the
    count goes up and training stops when it reaches ``patience`` (``PATIENCE_EXHAUSTED``).
    Defaults: min_delta 0, patience 3, check_finite True, both thresholds None.
    ``patience=None`` stands for a patience no run reaches (to isolate the other checks).
    """

    name = "Lightning EarlyStopping"

    def __init__(self, patience: int | None = 3, min_delta: float = 0.0, check_finite: bool = True,
                 stopping_threshold: float | None = None, divergence_threshold: float | None = None) -> None:
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.best = math.inf
        self.wait = 0
        reasons = set()
        if check_finite:
            reasons.add(NONFINITE)
        if divergence_threshold is not None:
            reasons.add(DIV)
        if patience is not None:
            reasons.add(EC)
        self.reasons = frozenset(reasons)

    def update(self, step: int, loss: float, grad_norm: float | None) -> Alarm | None:
        if self.check_finite and not _finite(loss):
            return Alarm(step, frozenset({NONFINITE}), "NON_FINITE_METRIC", stops=True)
        if self.stopping_threshold is not None and loss < self.stopping_threshold:
            return Alarm(step, frozenset(), "STOPPING_THRESHOLD", stops=True)
        if self.divergence_threshold is not None and loss > self.divergence_threshold:
            return Alarm(step, frozenset({DIV}), "DIVERGENCE_THRESHOLD", stops=True)
        if loss + self.min_delta < self.best:
            self.best = loss
            self.wait = 0
            return None
        self.wait += 1
        if self.patience is not None and self.wait >= self.patience:
            return Alarm(step, frozenset({EC}), "PATIENCE_EXHAUSTED", stops=True)
        return None


class KillLossSpike:
    """llm-foundry's ``KillLossSpike`` callback.

    Source: mosaicml/llm-foundry ``llmfoundry/callbacks/kill_loss_spike_callback.py`` at commit
    8c8dd48 (2025-07-21, version 0.22.0.dev0); step counting from mosaicml/composer
    ``composer/trainer/trainer.py`` at commit 6405188 (the batch counter is advanced before
    ``BATCH_END``, so at the check for the n-th batch ``current_step`` is n).

    Losses go into a window. Nothing is checked until the window holds 100 values; then its size
    is fixed once to ``max(100, round(0.05 * total batches))`` (Python's round) and, if that is
    more than 100, the window fills up to it first. From then on each value is compared with the
    mean of the window before it (the previous ``window`` values):

    - ``loss >= 2 * mean`` is an outlier; the count of consecutive outliers must *exceed* the
      patience (4) for ``LossSpikeError``: the 5th consecutive outlier fires, not the 4th (the
      source's docstring says so too). A value that is not an outlier resets the count.
    - otherwise, once ``current_step >= 2 * window``, ``HighLossError`` when at least half of the
      window is above the loss cap. The cap is 10 unless set; the source takes the first
      window's maximum as the cap only when ``current_step == window`` at a check, which under
      Composer's counting never happens (the first check is at batch window + 1), so it stays 10.

    A NaN loss is no outlier and, once in the window, makes its mean NaN until it leaves: no
    alarm meanwhile. ``log_only=False`` (the callback's name: kill) stops training at the first
    alarm. ``total`` is the number of values the run will log (``None``: unknown, window 100).
    """

    name = "llm-foundry KillLossSpike"
    reasons = frozenset({SPIKE, DIV})

    def __init__(self, total: int | None = None, patience: int = 4, outlier_multiplier: float = 2.0,
                 min_window: int = 100, loss_cap: float = 10.0, log_only: bool = False) -> None:
        self.total = total or 0
        self.patience = patience
        self.mult = outlier_multiplier
        self.window_size = min_window
        self.window_set = False
        self.loss_cap = loss_cap
        self.cap_set = False
        self.log_only = log_only
        self.window: deque[float] = deque()
        self.outliers = 0
        self.seen = 0

    def update(self, step: int, loss: float, grad_norm: float | None) -> Alarm | None:
        self.seen += 1
        current = self.seen
        alarm = None
        if len(self.window) == self.window_size:
            if not self.window_set:
                self.window_size = max(self.window_size, round(self.total * 0.05))
                self.window = deque(self.window, maxlen=self.window_size)
                self.window_set = True
                if len(self.window) < self.window_size:
                    self.window.append(loss)
                    return None
            if not self.cap_set and current == self.window_size:
                self.loss_cap = min(max(self.window), self.loss_cap)
                self.cap_set = True
            mean = float(np.mean(self.window))
            if loss >= mean * self.mult:
                self.outliers += 1
                if self.outliers > self.patience:
                    alarm = Alarm(step, frozenset({SPIKE, DIV}), "LossSpikeError", stops=not self.log_only)
            elif self.outliers > 0:
                self.outliers = 0
            if alarm is None and current >= 2 * self.window_size:
                high = sum(1 for v in self.window if v > self.loss_cap)
                if high >= self.window_size / 2:
                    alarm = Alarm(step, frozenset({DIV}), "HighLossError", stops=not self.log_only)
        self.window.append(loss)
        return alarm

    def run_many(self, steps: np.ndarray, losses: np.ndarray, grad_norms: np.ndarray | None) -> list[Alarm]:
        """``update`` over a whole log from a fresh state: the same alarms."""
        n = len(losses)
        w = self.window_size
        if n <= w:
            return []
        if not self.window_set:
            w = max(w, round(self.total * 0.05))
        if n <= w:
            return []
        with np.errstate(invalid="ignore"):
            means = _before(losses, w).mean(axis=1)
            outlier = losses[w:] >= means * self.mult
        above = np.concatenate(([0], np.cumsum(losses > self.loss_cap)))
        out: list[Alarm] = []
        count = 0
        for j in range(n - w):
            i = j + w
            alarm = None
            if outlier[j]:
                count += 1
                if count > self.patience:
                    alarm = Alarm(int(steps[i]), frozenset({SPIKE, DIV}), "LossSpikeError", stops=not self.log_only)
            elif count > 0:
                count = 0
            if alarm is None and i + 1 >= 2 * w and above[i] - above[i - w] >= w / 2:
                alarm = Alarm(int(steps[i]), frozenset({DIV}), "HighLossError", stops=not self.log_only)
            if alarm is not None:
                out.append(alarm)
                if alarm.stops:
                    break
        return out


class OLMoSkipStep:
    """OLMo-core's skip-step optimizers: a step whose loss or grad norm is an outlier is skipped.

    Source: allenai/OLMo-core ``src/olmo_core/optim/skip_step_optimizer.py`` at commit fa6c501
    (2026-06-22, version 2.5.0). The optimizer keeps the last 128 losses and grad norms plus the
    current one; once it holds at least 64 losses (``max(2, 128 // 2)``, the current one
    included) it takes the mean and the standard deviation (``torch.std_mean``: Bessel-corrected)
    of the earlier values and skips the step unless ``value - mean <= 6 * std`` holds for the
    loss and for the grad norm (when grad norms are recorded). A NaN anywhere in that comparison
    fails it: a NaN loss is skipped, and so is every step while a NaN is among the 128 earlier
    values. Training goes on. An alarm stands for a spike; where a non-finite value is what
    tripped it, for a non-finite loss.
    """

    name = "OLMo-core SkipStepOptimizer"
    reasons = frozenset({SPIKE, NONFINITE})

    def __init__(self, window: int = 128, sigmas: float = 6.0) -> None:
        self.sigmas = sigmas
        self.min_values = max(2, window // 2)
        self.losses: deque[float] = deque(maxlen=window + 1)
        self.gns: deque[float] = deque(maxlen=window + 1)

    def _fails(self, values: deque[float]) -> tuple[bool, bool]:
        """(the newest value fails the check, a non-finite number is involved)."""
        h = np.fromiter(values, float, len(values))
        cur, prev = float(h[-1]), h[:-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = float(prev.mean()) if len(prev) else math.nan
            std = float(prev.std(ddof=1)) if len(prev) > 1 else math.nan
        ok = (cur - mean) <= self.sigmas * std
        return (not ok), not (_finite(cur) and _finite(mean) and _finite(std))

    def update(self, step: int, loss: float, grad_norm: float | None) -> Alarm | None:
        self.losses.append(loss)
        if grad_norm is not None:
            self.gns.append(grad_norm)
        if len(self.losses) < self.min_values:
            return None
        bad, nonfinite = self._fails(self.losses)
        if grad_norm is not None:
            gbad, gnon = self._fails(self.gns)
            nonfinite = (bad and nonfinite) or (gbad and gnon)
            bad = bad or gbad
        if not bad:
            return None
        return Alarm(step, frozenset({NONFINITE}) if nonfinite else frozenset({SPIKE}), "skip_step")

    def _fails_many(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, w = len(x), self.losses.maxlen - 1  # type: ignore[operator]
        mean, std = np.full(n, np.nan), np.full(n, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            for i in range(max(self.min_values - 1, 1), min(w, n)):
                prev = x[:i]
                mean[i] = prev.mean()
                if i > 1:
                    std[i] = prev.std(ddof=1)
            if n > w:
                rows = _before(x, w)
                mean[w:] = rows.mean(axis=1)
                std[w:] = rows.std(axis=1, ddof=1)
            fails = ~((x - mean) <= self.sigmas * std)
        return fails, ~(np.isfinite(x) & np.isfinite(mean) & np.isfinite(std))

    def run_many(self, steps: np.ndarray, losses: np.ndarray, grad_norms: np.ndarray | None) -> list[Alarm]:
        """``update`` over a whole log from a fresh state: the same alarms."""
        bad, nonfinite = self._fails_many(losses)
        if grad_norms is not None:
            gbad, gnon = self._fails_many(grad_norms)
            nonfinite = (bad & nonfinite) | (gbad & gnon)
            bad = bad | gbad
        bad[: self.min_values - 1] = False
        return [Alarm(int(steps[i]), frozenset({NONFINITE}) if nonfinite[i] else frozenset({SPIKE}), "skip_step")
                for i in np.flatnonzero(bad)]


class OLMoStabilityMonitor:
    """OLMo-core's ``StabilityMonitorCallback``: counts loss and grad-norm spikes.

    Source: allenai/OLMo-core ``src/olmo_core/train/callbacks/stability_monitor.py`` at commit
    fa6c501 (version 2.5.0). Defaults: window 128, 6 standard deviations. Only once the history
    holds a full window of earlier values: the population standard deviation (no Bessel
    correction) of the last 128; a spike is ``value > mean + 6 * std``, never when
    ``std < 1e-10``. Loss and grad norm each have their own history; either spiking makes the
    step a spike. It only records a spike score (a metric someone alerts on): training goes on.
    """

    name = "OLMo-core StabilityMonitor"
    reasons = frozenset({SPIKE})

    def __init__(self, window: int = 128, sigmas: float = 6.0) -> None:
        self.window = window
        self.sigmas = sigmas
        self.losses: deque[float] = deque(maxlen=window)
        self.gns: deque[float] = deque(maxlen=window)

    def _spike(self, value: float, history: deque[float]) -> bool:
        if len(history) < self.window:
            return False
        h = np.fromiter(history, float, len(history))
        with np.errstate(invalid="ignore", over="ignore"):
            mean = float(h.mean())
            std = math.sqrt(float(np.mean((h - mean) ** 2)))
        if std < 1e-10:
            return False
        return value > mean + self.sigmas * std

    def update(self, step: int, loss: float, grad_norm: float | None) -> Alarm | None:
        spike = self._spike(loss, self.losses)
        self.losses.append(loss)
        if grad_norm is not None:
            spike = self._spike(grad_norm, self.gns) or spike
            self.gns.append(grad_norm)
        return Alarm(step, self.reasons, "spike") if spike else None

    def _spikes_many(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros(len(x), bool)
        if len(x) <= self.window:
            return out
        rows = _before(x, self.window)
        with np.errstate(invalid="ignore", over="ignore"):
            mean = rows.mean(axis=1)
            std = np.sqrt(np.mean((rows - mean[:, None]) ** 2, axis=1))
            out[self.window:] = ~(std < 1e-10) & (x[self.window:] > mean + self.sigmas * std)
        return out

    def run_many(self, steps: np.ndarray, losses: np.ndarray, grad_norms: np.ndarray | None) -> list[Alarm]:
        """``update`` over a whole log from a fresh state: the same alarms."""
        spikes = self._spikes_many(losses)
        if grad_norms is not None:
            spikes |= self._spikes_many(grad_norms)
        return [Alarm(int(steps[i]), self.reasons, "spike") for i in np.flatnonzero(spikes)]


class MegatronChecks:
    """Megatron-LM's loss checks: NaN/inf loss or gradient (fatal) and the "spiky loss" check.

    Source: NVIDIA/Megatron-LM at commit d98e8a6 (2026-08-22, megatron-core 0.20.0):
    ``pretrain_gpt.py`` (``loss_func``: a NaN loss, then an inf loss, fails the run when
    ``check_for_nan_in_loss_and_grad`` is on, the default; then, with ``--check-for-spiky-loss``,
    the spiky check with ``SPIKY_LOSS_FACTOR = 10``, not fatal),
    ``megatron/core/rerun_state_machine.py`` (``is_unexpectedly_large``: NaN and inf are
    ignored; the first 100 finite values only set the maximum of ``|value|``; afterwards a value
    is flagged when ``|value| >= 10 * that maximum``) and
    ``megatron/core/distributed/param_and_grad_buffer.py`` (NaN or inf gradients fail the run).
    A spiky loss is logged as a warning and training goes on; it stands for a spike or, when it
    lasts, a divergence. A non-finite loss or grad norm stops training.
    """

    name = "Megatron-LM checks"
    reasons = frozenset({NONFINITE, SPIKE, DIV})

    def __init__(self, factor: float = 10.0, num_samples: int = 100, spiky: bool = True) -> None:
        self.factor = factor
        self.num_samples = num_samples
        self.spiky = spiky
        self.count = 0
        self.max_value = 0.0

    def update(self, step: int, loss: float, grad_norm: float | None) -> Alarm | None:
        if not _finite(loss):
            return Alarm(step, frozenset({NONFINITE}), "nan_or_inf_loss", stops=True)
        spiky = None
        if self.spiky:
            value = abs(loss)
            if self.count < self.num_samples:
                self.count += 1
                self.max_value = max(self.max_value, value)
            elif value >= self.max_value * self.factor:
                spiky = Alarm(step, frozenset({SPIKE, DIV}), "spiky_loss")
        if grad_norm is not None and not _finite(grad_norm):
            return Alarm(step, frozenset({NONFINITE}), "nan_or_inf_grad", stops=True)
        return spiky


def _slope_stats(y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``y`` against 0, 1, 2, ... and its standard error, as dlib's
    ``running_gradient`` computes them (its recursive least squares starts from a 1e6 prior,
    which this exact fit leaves out)."""
    n = len(y)
    x = np.arange(n, dtype=float)
    xm = (n - 1) / 2.0
    sxx = (n ** 3 - n) / 12.0
    ym = float(y.mean())
    slope = float(np.dot(x - xm, y - ym) / sxx)
    resid = y - ym - slope * (x - xm)
    sse = float(np.dot(resid, resid))
    se = math.sqrt(sse / (n - 2) * 12.0 / (n ** 3 - n)) if n > 2 else math.inf
    return slope, se


def _p_greater_than_zero(slope: float, se: float) -> float:
    """dlib's ``probability_gradient_greater_than(0)``: 1 - Phi((0 - slope) / se)."""
    if se == 0.0 or not math.isfinite(se):
        if se == 0.0:
            return 1.0 if slope > 0 else (0.0 if slope < 0 else 0.5)
        return 0.5
    return 1.0 - 0.5 * math.erfc(slope / se / math.sqrt(2.0))


def _upper_quantile(values: np.ndarray, quantile: float) -> float:
    """dlib's ``find_upper_quantile``: the element at ``round((n - 1) * (1 - quantile))`` in
    sorted order (C++ rounding: halves away from zero)."""
    idx = int(math.floor((len(values) - 1) * (1.0 - quantile) + 0.5))
    return float(np.partition(values, idx)[idx])


def probability_values_are_increasing(values: Sequence[float] | np.ndarray, robust: bool = False,
                                      quantile_discard: float = 0.10) -> float:
    """dlib's ``probability_values_are_increasing`` (``_robust``: values above the upper 10%
    quantile left out): P(slope > 0) from a least-squares fit; 0.5 with 2 values or fewer."""
    y = np.asarray(values, dtype=float)
    if robust and len(y):
        y = y[y <= _upper_quantile(y, quantile_discard)]
    if len(y) <= 2:
        return 0.5
    return _p_greater_than_zero(*_slope_stats(y))


def _normal_quantile(p: float) -> float:
    """z with Phi(z) = p (bisection on math.erfc; used once per threshold)."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def count_steps_without_decrease(values: Sequence[float] | np.ndarray, robust: bool = False,
                                 probability_of_decrease: float = 0.51,
                                 quantile_discard: float = 0.10) -> int:
    """dlib's ``count_steps_without_decrease`` (``_robust``: values above the upper 10% quantile
    left out of every fit): the longest stretch at the end of ``values`` over which one cannot
    say with probability ``probability_of_decrease`` that the values go down.

    dlib walks backwards from the newest value, adding each (kept) value to a running fit; at
    every position j where the fit holds more than 2 values it asks whether P(the values
    decrease) < 0.51, and returns the last such j (positions of discarded values count too,
    with the fit as it stood). A NaN makes that probability NaN, which is never < 0.51. Computed
    here for all positions at once from running sums.
    """
    y = np.asarray(values, dtype=float)[::-1]
    n_all = len(y)
    if n_all == 0:
        return 0
    idx = np.arange(n_all)
    if robust:
        idx = np.flatnonzero(y <= _upper_quantile(y, quantile_discard))
    v = y[idx]
    if len(v) < 3:
        return 0
    v = v - float(np.median(v[np.isfinite(v)])) if np.isfinite(v).any() else v  # stable running sums
    m = np.arange(1, len(v) + 1, dtype=float)
    x = m - 1.0  # dlib's x: the number of values fitted before this one
    sx, sxx = np.cumsum(x), np.cumsum(x * x)
    sy, sxy, syy = np.cumsum(v), np.cumsum(x * v), np.cumsum(v * v)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / m
        slope = cov / (sxx - sx * sx / m)
        sse = np.maximum(syy - sy * sy / m - slope * cov, 0.0)
        se = np.sqrt(sse / (m - 2) * 12.0 / (m ** 3 - m))
        z = slope / se  # of the reversed series: > 0 means the values decrease with time
    scale = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 1.0
    tiny = 1e-12 * max(scale, 1e-300)
    exact = sse <= tiny * tiny * m  # a perfect line: dlib's normal_cdf with a zero deviation
    z_limit = _normal_quantile(probability_of_decrease)
    flat = np.abs(slope) * m <= tiny
    uncertain = np.where(exact, flat | (slope < 0), z < z_limit) & (m > 2)
    if not uncertain.any():
        return 0
    last = int(np.flatnonzero(uncertain)[-1])
    return int(idx[last + 1]) if last + 1 < len(idx) else n_all


def _decrease_uncertain(rows: np.ndarray, probability_of_decrease: float = 0.51) -> np.ndarray:
    """For each row, whether a least-squares fit over all of it leaves P(the values decrease)
    below ``probability_of_decrease``, with ``count_steps_without_decrease``'s conventions (a
    perfect fit is certain unless flat; a NaN is never uncertain). That is the question the
    count answers at its last position: ``count_steps_without_decrease(v) >= len(v)`` exactly
    when this holds for ``v`` (the tests check it)."""
    n = rows.shape[1]
    x = np.arange(n, dtype=float) - (n - 1) / 2.0
    sxx = (n ** 3 - n) / 12.0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        centre = np.median(rows, axis=1)
        v = rows - centre[:, None]
        vm = v.mean(axis=1)
        slope = np.sum(v * x, axis=1) / sxx  # forward in time
        resid = v - vm[:, None] - slope[:, None] * x
        sse = np.sum(resid * resid, axis=1)
        se = np.sqrt(sse / (n - 2) * 12.0 / (n ** 3 - n))
        z = -slope / se  # of the series walked backwards, as dlib walks it
        scale = np.max(np.abs(v), axis=1)
    tiny = 1e-12 * np.maximum(scale, 1e-300)
    exact = sse <= tiny * tiny * n
    flat = np.abs(slope) * n <= tiny
    return np.where(exact, flat | (slope > 0), z < _normal_quantile(probability_of_decrease)) & (n > 2)


class DlibPlateau:
    """dlib's ``dnn_trainer`` learning-rate shrink: the loss has stopped going down.

    Source: davisking/dlib at commit 3d40bf5 (2026-05-06, version 20.0.99): ``dlib/dnn/trainer.h``
    (``record_loss``, the training loop's LR check, ``drop_some_previous_loss_values``) and
    ``dlib/statistics/running_gradient.h``. The trainer keeps the last
    ``iterations_without_progress_threshold`` losses (default 2000; dlib's examples use 300 to
    50,000). Each loss adds 200 to a budget; when the budget exceeds the threshold it is spent
    and the trainer checks ``count_steps_without_decrease(losses) >= threshold`` and, to be
    robust to a few bad batches, the same with the top 10% of values left out; when both hold it
    cuts the LR by ``learning_rate_shrink`` (0.1) and drops the oldest ``400 + threshold / 10``
    losses. Training goes on. A count can only reach the threshold over a full history, and
    then it does exactly when the fit over the whole history is uncertain
    (``_decrease_uncertain``), which is how it is computed here.
    """

    name = "dlib dnn_trainer LR shrink"
    reasons = frozenset({EC})

    def __init__(self, threshold: int = 2000, dump_amount: int = 400) -> None:
        self.threshold = threshold
        self.dump = dump_amount + threshold // 10
        self.losses: deque[float] = deque(maxlen=threshold)
        self.budget = 0

    def _robust_uncertain(self, values: np.ndarray) -> bool:
        kept = values[values <= _upper_quantile(values, 0.10)]
        return len(kept) > 2 and bool(_decrease_uncertain(kept[None, :])[0])

    def update(self, step: int, loss: float, grad_norm: float | None) -> Alarm | None:
        self.budget += 200
        self.losses.append(loss)
        if self.budget <= self.threshold:
            return None
        self.budget = 0
        if len(self.losses) < self.threshold:
            return None
        values = np.fromiter(self.losses, float, len(self.losses))
        if not _decrease_uncertain(values[None, :])[0] or not self._robust_uncertain(values):
            return None
        for _ in range(min(self.dump, len(self.losses))):
            self.losses.popleft()
        return Alarm(step, self.reasons, "learning_rate_shrink")

    def run_many(self, steps: np.ndarray, losses: np.ndarray, grad_norms: np.ndarray | None) -> list[Alarm]:
        """``update`` over a whole log from a fresh state: the same alarms. The history is
        always the newest values, so each full-history fit is a window of the log."""
        t, n = self.threshold, len(losses)
        if n < t:
            return []
        uncertain = _decrease_uncertain(np.lib.stride_tricks.sliding_window_view(losses, t))  # row: ends at i
        out: list[Alarm] = []
        held = budget = 0
        for i in range(n):
            budget += 200
            held = min(held + 1, t)
            if budget <= t:
                continue
            budget = 0
            if held < t or not uncertain[i - t + 1] or not self._robust_uncertain(losses[i - t + 1:i + 1]):
                continue
            held -= min(self.dump, held)
            out.append(Alarm(int(steps[i]), self.reasons, "learning_rate_shrink"))
        return out


class DlibDivergence:
    """dlib's ``dnn_trainer`` reload: the loss has been going up since the last save.

    Source: davisking/dlib at commit 3d40bf5 (version 20.0.99): ``dlib/dnn/trainer.h``
    (``sync_to_disk``, ``loss_increased_since_last_disk_sync``) and
    ``dlib/statistics/running_gradient.h``. At each save (every ``time_between_syncs``, 15
    minutes by default; here every ``sync_every`` logged values) the trainer looks at the losses
    since a little before the last save (twice the steps since it): any NaN or inf means reload;
    fewer than 30 values mean no; otherwise reload when ``max(P(slope > 0), P_robust(slope > 0))``
    exceeds a threshold that starts at 0.99, moves towards 1 after each reload
    (``0.1 * t + 0.9``, at most 0.99999) and decays back (``t ** 10``, not below 0.99) after
    each clean save. The first save has nothing to reload. A reload restores the saved state
    (its loss history with it); training goes on from there, which a recorded curve cannot
    follow: the replay keeps going along the log.
    """

    name = "dlib dnn_trainer reload"
    reasons = frozenset({DIV, NONFINITE})

    def __init__(self, sync_every: int = 50, min_values: int = 30, threshold: float = 0.99,
                 max_threshold: float = 0.99999) -> None:
        self.sync_every = sync_every
        self.min_values = min_values
        self.default = threshold
        self.max_threshold = max_threshold
        self.threshold = threshold
        self.history: deque[float] = deque()
        self.saved: list[float] | None = None
        self.since_sync = 0

    def update(self, step: int, loss: float, grad_norm: float | None) -> Alarm | None:
        self.history.append(loss)
        self.since_sync += 1
        if self.since_sync < self.sync_every:
            return None
        since, self.since_sync = self.since_sync, 0
        if self.saved is None:  # nothing on disk yet: save
            self.saved = list(self.history)
            return None
        while len(self.history) > 2 * since:
            self.history.popleft()
        values = np.fromiter(self.history, float, len(self.history))
        alarm = None
        if not np.isfinite(values).all():
            alarm = Alarm(step, frozenset({NONFINITE}), "reload_nonfinite")
        elif len(values) >= self.min_values:
            p = max(probability_values_are_increasing(values),
                    probability_values_are_increasing(values, robust=True))
            if p > self.threshold:
                self.threshold = min(0.1 * self.threshold + 0.9, self.max_threshold)
                alarm = Alarm(step, frozenset({DIV}), "reload_loss_increasing")
            else:
                self.threshold = max(self.threshold ** 10, self.default)
        if alarm is not None:
            self.history = deque(self.saved)
        else:
            self.saved = list(self.history)
        return alarm


@dataclass(frozen=True)
class PeerSpec:
    """One rule as the benchmark configures it: a row label, the reasons its row is shown for,
    and how to build it for a run (from the number of values the run will log and its first
    finite loss, both known at the first logged value).

    A rule with a ``knob`` (a patience, a threshold) can be rebuilt with another setting
    (``at``); the benchmark picks one from ``grid`` on data it may tune on.
    """

    name: str
    setting: str
    shown_for: frozenset[Reason]
    build: Callable[[int, float], PeerRule]
    note: str = ""
    knob: str = ""
    grid: tuple[float, ...] = ()
    build_at: Callable[[int, float, float], PeerRule] | None = None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.setting})"

    def at(self, value: float, why: str) -> PeerSpec:
        """This rule with its knob at ``value``; ``why`` says how the value was chosen."""
        if self.build_at is None:
            raise ValueError(f"{self.name} has no knob to set")
        build_at = self.build_at
        return PeerSpec(self.name, f"{self.knob} {value:g}, {why}", self.shown_for,
                        lambda n, first: build_at(n, first, value), self.note, self.knob, (), None)


def standard_peers() -> list[PeerSpec]:
    """The peers as ``benchmarks/detection.py`` runs them: their sources' defaults, except where
    a value must be chosen (said in ``note``)."""
    patience = (1, 2, 3, 5, 10, 20, 50, 100, 200)
    return [
        PeerSpec("transformers EarlyStoppingCallback", "patience 1", frozenset({EC}),
                 lambda n, first: HFEarlyStopping(), "defaults: patience 1, threshold 0",
                 "patience", patience, lambda n, first, v: HFEarlyStopping(patience=int(v))),
        PeerSpec("torch ReduceLROnPlateau", "patience 10, rel 1e-4", frozenset({EC}),
                 lambda n, first: TorchReduceLROnPlateau(), "defaults",
                 "patience", (10, 20, 50, 100, 200, 500), lambda n, first, v: TorchReduceLROnPlateau(patience=int(v))),
        PeerSpec("Lightning EarlyStopping", "patience 3", frozenset({EC}),
                 lambda n, first: LightningEarlyStopping(), "defaults (check_finite on)",
                 "patience", patience, lambda n, first, v: LightningEarlyStopping(patience=int(v))),
        PeerSpec("Lightning EarlyStopping", "check_finite", frozenset({NONFINITE}),
                 lambda n, first: LightningEarlyStopping(patience=None),
                 "patience out of reach, to isolate the check"),
        PeerSpec("Lightning EarlyStopping", "divergence_threshold = first loss", frozenset({DIV}),
                 lambda n, first: LightningEarlyStopping(patience=None, divergence_threshold=first),
                 "a value worse than the untrained model's: 'the model cannot recover'",
                 "divergence_threshold / first loss", (1.0, 1.5, 2.0, 3.0, 5.0),
                 lambda n, first, v: LightningEarlyStopping(patience=None, divergence_threshold=v * first)),
        PeerSpec("dlib LR shrink", "300 values without decrease", frozenset({EC}),
                 lambda n, first: DlibPlateau(threshold=300),
                 "threshold 300, the smallest in dlib's examples (default 2000)",
                 "values without decrease", (300, 1000, 2000), lambda n, first, v: DlibPlateau(threshold=int(v))),
        PeerSpec("dlib reload", "P(slope > 0) > 0.99, a save every 50 values", frozenset({DIV, NONFINITE}),
                 lambda n, first: DlibDivergence(sync_every=50), "saves every 50 values stand for 15 minutes",
                 "values between saves", (25, 50, 100, 200), lambda n, first, v: DlibDivergence(sync_every=int(v))),
        PeerSpec("llm-foundry KillLossSpike", "2x the window mean, 5 in a row", frozenset({SPIKE, DIV}),
                 lambda n, first: KillLossSpike(total=n), "window max(100, 5% of the values)"),
        PeerSpec("OLMo-core SkipStepOptimizer", "6 sigma, 128", frozenset({SPIKE, NONFINITE}),
                 lambda n, first: OLMoSkipStep(), "defaults"),
        PeerSpec("OLMo-core StabilityMonitor", "6 sigma, 128", frozenset({SPIKE}),
                 lambda n, first: OLMoStabilityMonitor(), "defaults"),
        PeerSpec("Megatron-LM spiky loss", "10x the max of the first 100", frozenset({SPIKE, DIV}),
                 lambda n, first: MegatronChecks(), "--check-for-spiky-loss on"),
        PeerSpec("Megatron-LM NaN/inf checks", "loss and grads", frozenset({NONFINITE}),
                 lambda n, first: MegatronChecks(spiky=False), "default on"),
    ]
