"""Labelled synthetic loss curves for evaluating the detectors (``benchmarks/detection.py``).

Each curve is a healthy decay (power law, exponential, slow power law or an epoch staircase,
optionally with a warmup bump) with per-step noise (Gaussian or heavy-tailed Student-t), plus
at most one injected anomaly whose kind and onset step are the label. Curves are generated per
optimizer step and then logged every ``log_every`` steps the way the Trainer does: the logged
loss is the mean over the interval, the grad norm and LR are the last step's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lossguard.records import Reason, Sample

HEALTHY_KINDS = ("power", "exp", "slow", "staircase", "warmup")
ANOMALY_KINDS = ("plateau", "stuck", "plateau_resolves", "spike", "spike_cluster",
                 "divergence_slow", "divergence_fast", "nonfinite")


@dataclass
class Curve:
    """One labelled run: what the detectors see, and what they should find."""

    kind: str
    samples: list[Sample]
    max_steps: int
    log_every: int
    labels: list[tuple[Reason, int]] = field(default_factory=list)  # (reason, onset step)
    noise: str = "gauss"


def _base(kind: str, t: np.ndarray, total: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """A healthy mean curve, its LR schedule and its number of epochs."""
    c = rng.uniform(0.3, 1.5)
    a = rng.uniform(1.0, 2.5)
    warm = 0
    epochs = 1
    if kind in ("power", "warmup", "staircase"):
        curve = c + a * (1.0 + t / rng.uniform(10, 100)) ** -rng.uniform(0.3, 1.0)
    elif kind == "exp":
        curve = c + a * np.exp(-t / (rng.uniform(0.05, 0.5) * total))
    elif kind == "slow":
        curve = c + a * (1.0 + t / rng.uniform(30, 200)) ** -rng.uniform(0.12, 0.25)
    else:
        raise ValueError(kind)
    if kind == "staircase":
        epochs = int(rng.integers(3, 7))
        length = total / epochs
        first = curve.copy()
        level = first[min(int(length), len(t) - 1)]
        for k in range(1, epochs):
            level *= 1.0 - rng.uniform(0.08, 0.25)
            seg = (t >= k * length) & (t < (k + 1) * length)
            within = (t[seg] - k * length) / length
            curve[seg] = level * (1.0 - 0.02 * within) + (first[seg] - first[seg][-1]) * 0.05
        if rng.random() < 0.5:
            warm = int(rng.uniform(0.03, 0.08) * total)
    if kind == "warmup":
        warm = int(rng.uniform(0.03, 0.1) * total)
        bump = rng.uniform(0.05, 0.2) * curve[0]
        curve = curve + bump * np.minimum(t / max(warm, 1), 1.0) * np.exp(-np.maximum(t - warm, 0) / max(warm, 1))
    peak = 10 ** rng.uniform(-5, -3)
    lr = np.where(t < warm, peak * (t + 1) / max(warm, 1), peak * (1.0 - (t - warm) / max(total - warm, 1)))
    return curve, np.maximum(lr, 0.0), epochs


def make_curve(kind: str, seed: int, *, max_steps: int | None = None, log_every: int = 1,
               heavy_tails: bool | None = None) -> Curve:
    """One labelled curve of ``kind`` (a healthy kind or an anomaly kind), deterministic per seed."""
    rng = np.random.default_rng(seed)
    total = max_steps or int(rng.choice([1000, 2000, 3000]))
    t = np.arange(total, dtype=float)
    base_kind = kind if kind in HEALTHY_KINDS else str(rng.choice(["power", "exp", "warmup"]))
    if kind in ("plateau", "plateau_resolves"):
        base_kind = str(rng.choice(["power", "exp"]))
    curve, lr, epochs = _base(base_kind, t, total, rng)
    heavy = bool(rng.random() < 0.4) if heavy_tails is None else heavy_tails
    rel = rng.uniform(0.02, 0.08)
    if heavy:
        noise = rng.standard_t(4, total) / math.sqrt(2.0)
    else:
        noise = rng.standard_normal(total)
    labels: list[tuple[Reason, int]] = []
    gn = rng.uniform(0.3, 3.0) * (0.5 + 0.5 * curve / curve[0]) * np.exp(0.2 * rng.standard_normal(total))

    if kind == "plateau":
        for _ in range(20):
            onset = int(rng.uniform(0.08, 0.4) * total)
            if curve[onset] - curve[-1] >= 0.15 * curve[onset]:
                break
            curve, lr, epochs = _base(base_kind, t, total, rng)
        curve[onset:] = curve[onset]
        labels.append((Reason.EARLY_CONVERGENCE, onset))
    elif kind == "stuck":
        onset = 0
        curve[:] = rng.uniform(1.5, 3.5)
        labels.append((Reason.EARLY_CONVERGENCE, onset))
    elif kind == "plateau_resolves":
        onset = int(rng.uniform(0.1, 0.3) * total)
        dur = int(rng.uniform(250, 400))
        shifted = curve.copy()
        shifted[onset:onset + dur] = curve[onset]
        shifted[onset + dur:] = curve[onset:total - dur]
        curve = shifted
        labels.append((Reason.EARLY_CONVERGENCE, onset))
    elif kind in ("spike", "spike_cluster"):
        onset = int(rng.uniform(0.1, 0.9) * total)
        count = 1 if kind == "spike" else int(rng.integers(3, 7))
        at = [onset] + sorted(int(onset + rng.integers(1, 50)) for _ in range(count - 1))
        for s in at:
            width = int(rng.choice([1, 2, 3, 5]))
            mult = rng.uniform(2.5, 8.0)
            curve[s:s + width] *= mult
            gn[s:s + width] *= mult * rng.uniform(3, 20)
        labels.append((Reason.SPIKE, onset))
    elif kind in ("divergence_slow", "divergence_fast"):
        onset = int(rng.uniform(0.2, 0.7) * total)
        after = t[onset:] - onset
        if kind == "divergence_slow":
            span = rng.uniform(300, 600)
            curve[onset:] = curve[onset] * (1.0 + rng.uniform(0.4, 1.0) * np.minimum(after / span, 1.5))
        else:
            curve[onset:] = curve[onset] * np.minimum(np.exp(after / rng.uniform(20, 60)), 20.0)
            gn[onset:] *= np.minimum(np.exp(after / 30.0), 1e3)
        labels.append((Reason.DIVERGENCE, onset))
    elif kind == "nonfinite":
        onset = int(rng.uniform(0.1, 0.9) * total)
        bad = float(rng.choice([np.nan, np.inf]))
        length = int(rng.choice([1, 5, total]))
        curve[onset:onset + length] = bad
        gn[onset:onset + length] = np.nan
        labels.append((Reason.NONFINITE, onset))
    elif kind not in HEALTHY_KINDS:
        raise ValueError(f"unknown curve kind {kind!r}")

    with np.errstate(invalid="ignore"):
        loss = curve * (1.0 + rel * noise)
    samples: list[Sample] = []
    spe = total / epochs
    for end in range(log_every, total + 1, log_every):
        lo = end - log_every
        samples.append(Sample(
            step=end,
            loss=float(np.mean(loss[lo:end])),
            grad_norm=float(gn[end - 1]),
            lr=float(lr[end - 1]),
            epoch=end / spe,
        ))
    if log_every > 1:
        labels = _visible(labels, curve, loss, log_every)
    return Curve(kind=kind, samples=samples, max_steps=total, log_every=log_every, labels=labels,
                 noise="heavy" if heavy else "gauss")


def _visible(labels: list[tuple[Reason, int]], curve: np.ndarray, loss: np.ndarray, k: int) -> list[tuple[Reason, int]]:
    """Drop spike labels that averaging over ``k`` steps makes invisible (< 1.3x the baseline)."""
    out = []
    for reason, onset in labels:
        if reason == Reason.SPIKE:
            lo = (onset // k) * k
            means = [float(np.mean(loss[j:j + k])) for j in range(lo, min(lo + 3 * k, len(loss) - k + 1), k)]
            before = float(np.median(loss[max(lo - 10 * k, 0):lo])) if lo > 0 else means[0]
            if not means or max(means) < 1.3 * before:
                continue
        out.append((reason, onset))
    return out


def standard_set(*, healthy: int = 50, per_anomaly: int = 20, log_every: tuple[int, ...] = (1, 10, 20),
                 seed: int = 0) -> list[Curve]:
    """The benchmark's curves: ``healthy`` healthy runs and ``per_anomaly`` of each anomaly kind,
    for each logging interval (kinds cycle, seeds are consecutive from ``seed``)."""
    curves = []
    n = seed
    for k in log_every:
        for i in range(healthy):
            curves.append(make_curve(HEALTHY_KINDS[i % len(HEALTHY_KINDS)], n, log_every=k))
            n += 1
        for kind in ANOMALY_KINDS:
            for _ in range(per_anomaly):
                curves.append(make_curve(kind, n, log_every=k))
                n += 1
    return curves


SCORED = (Reason.SPIKE, Reason.DIVERGENCE, Reason.NONFINITE, Reason.EARLY_CONVERGENCE)


@dataclass
class Score:
    """How one detector did on a set of curves."""

    reason: Reason
    labels: int = 0
    detected: int = 0
    findings: int = 0
    matched: int = 0
    healthy_runs: int = 0
    healthy_findings: int = 0
    healthy_runs_alarmed: int = 0
    latencies: list[int] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.detected / self.labels if self.labels else float("nan")

    @property
    def precision(self) -> float:
        return self.matched / self.findings if self.findings else float("nan")

    @property
    def false_alarms_per_healthy_run(self) -> float:
        return self.healthy_findings / self.healthy_runs if self.healthy_runs else float("nan")

    @property
    def median_latency(self) -> float:
        return float(np.median(self.latencies)) if self.latencies else float("nan")


def _max_latency(reason: Reason, curve: Curve) -> int:
    k = curve.log_every
    if reason == Reason.SPIKE:
        return 3 * k + 5
    if reason == Reason.NONFINITE:
        return k
    if reason == Reason.DIVERGENCE:
        return 600
    return curve.max_steps // 2


def score(curves: list[Curve], config: object | None = None) -> dict[Reason, Score]:
    """Run the full ``DetectorSuite`` over each curve and score every detector against the labels.

    A finding matches a label of its reason when it is detected between the labelled onset and
    the reason's latency limit. Spike, grad and divergence findings after the onset of a
    divergence or a non-finite run are consequences of it, counted neither right nor wrong.
    """
    from lossguard.signals.suite import DetectorSuite

    scores = {r: Score(r) for r in SCORED}
    for curve in curves:
        suite = DetectorSuite(config, max_steps=curve.max_steps)  # type: ignore[arg-type]
        found = []
        for s in curve.samples:
            found.extend(suite.observe(s))
        healthy = not curve.labels and curve.kind in HEALTHY_KINDS
        catastrophic = [o for r, o in curve.labels if r in (Reason.DIVERGENCE, Reason.NONFINITE)]
        for reason, sc in scores.items():
            mine = [f for f in found if f.reason == reason]
            labels = [o for r, o in curve.labels if r == reason]
            if healthy:
                sc.healthy_runs += 1
                sc.healthy_findings += len(mine)
                sc.healthy_runs_alarmed += bool(mine)
            for onset in labels:
                sc.labels += 1
                hits = [f for f in mine if onset <= f.step <= onset + _max_latency(reason, curve)]
                if hits:
                    sc.detected += 1
                    sc.latencies.append(hits[0].step - onset)
            for f in mine:
                if any(o <= f.step <= o + _max_latency(reason, curve) for o in labels):
                    sc.matched += 1
                    sc.findings += 1
                elif not any(f.step >= o for o in catastrophic):
                    sc.findings += 1
    return scores
