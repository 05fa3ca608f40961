"""Labelled synthetic loss curves for evaluating the detectors (``benchmarks/detection.py``).

Each curve is a healthy decay with per-step noise (Gaussian or heavy-tailed Student-t), plus at
most one injected anomaly whose kind and onset step are the label. Curves are generated per
optimizer step and then logged every ``log_every`` steps the way the Trainer does: the logged
loss is the mean over the interval, the grad norm and LR are the last step's.

**What counts as a premature plateau.** A decay that drops fast and then continues slowly, or
flattens at the level the data allows, is healthy: that is what a fine-tune of a pretrained
model looks like (``fast_slow``, ``decay_flat``, ``exp``). A plateau is labelled early
convergence only where the generator knows the run is stuck: it stalls at a reference level a
training callback can know -- the uniform-prediction level ``ln V`` or the unigram (label
prior) level -- far above the level its data allows (``floor``). Every curve records those
references (``Curve.references``) and the floor, healthy or not, so that evidence-based
detection can be given them and cannot tell the labels from their presence.

Two regimes: ``finetune`` curves start at 1.3-4 nats, far below the uniform and unigram levels of
a 32k-152k vocabulary; ``scratch`` curves (a small-vocabulary task trained from scratch, like
the tiny reversal task) start at ``ln V`` and pass through the unigram level on their way down,
unless they stall there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lossguard.records import Finding, Reason, Sample

HEALTHY_KINDS = ("power", "exp", "slow", "staircase", "warmup", "fast_slow", "decay_flat", "scratch")
ANOMALY_KINDS = ("plateau", "stuck", "plateau_resolves", "spike", "spike_cluster",
                 "divergence_slow", "divergence_fast", "nonfinite", "zero_loss")
PLATEAU_KINDS = ("plateau", "stuck", "plateau_resolves")  # the kinds labelled early_convergence
SCRATCH_KINDS = ("scratch", "plateau", "plateau_resolves", "stuck")
_BASE_KINDS = ("power", "exp", "slow", "staircase", "warmup")  # shapes ``_base`` draws itself
# vocabularies of common pretrained tokenizers (Llama 2, Mistral, GPT-2, Llama 3, Qwen 2)
_LLM_VOCABS = (32000, 32768, 50257, 128256, 151936)


@dataclass
class Curve:
    """One labelled run: what the detectors see, what they should find, and what was known.

    ``references`` holds the levels a training callback can know for this run: ``uniform``
    (ln V, the loss of a model that predicts every token alike), ``unigram`` (the entropy of the
    label prior: what a model that ignores the context reaches) and ``initial`` (the noise-free
    loss at step 0). ``floor`` is the level the data allows (an oracle, for analysis only).
    ``stall`` names the reference a premature plateau sits at ("uniform" or "unigram");
    ``flat_from`` is the step where a ``decay_flat`` curve (healthy) or a premature plateau
    turns flat.
    """

    kind: str
    samples: list[Sample]
    max_steps: int
    log_every: int
    labels: list[tuple[Reason, int]] = field(default_factory=list)  # (reason, onset step)
    noise: str = "gauss"
    regime: str = "finetune"
    vocab_size: int = 32000
    references: dict[str, float] = field(default_factory=dict)
    floor: float = 0.0
    stall: str | None = None
    flat_from: int | None = None

    @property
    def healthy(self) -> bool:
        return not self.labels and self.kind in HEALTHY_KINDS


def _base(kind: str, t: np.ndarray, total: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, float]:
    """A healthy mean curve, its LR schedule, its number of epochs and the level it decays to."""
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
    return curve, np.maximum(lr, 0.0), epochs, c


def _decay_through(t: np.ndarray, start: float, end: float, at_step: float, level: float,
                   rng: np.random.Generator) -> np.ndarray:
    """A decay from ``start`` towards ``end`` that passes ``level`` at ``at_step``
    (exponential or power law, drawn)."""
    ratio = (start - end) / (level - end)
    if rng.random() < 0.5:
        return end + (start - end) * np.exp(-t * math.log(ratio) / at_step)
    p = rng.uniform(0.5, 1.5)
    t0 = at_step / (ratio ** (1.0 / p) - 1.0)
    return end + (start - end) * (1.0 + t / t0) ** -p


def _scratch(kind: str, t: np.ndarray, total: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, dict[str, float], float, int, str | None]:
    """A small-vocabulary task trained from scratch: the curve, its references, its floor, the
    onset of a premature plateau (-1 for none) and the reference it stalls at."""
    if kind == "stuck":  # never leaves the uniform level (the tiny reversal task at lr 3e-2: ln 20)
        vocab = int(rng.integers(5, 34))
    else:
        vocab = int(round(math.exp(rng.uniform(math.log(8), math.log(512)))))
    uniform = math.log(vocab)
    unigram = uniform * rng.uniform(0.55, 0.9)
    initial = uniform * rng.uniform(1.0, 1.08)
    floor = unigram * rng.uniform(0.05, 0.4)
    onset, stall = -1, None
    if kind == "stuck":
        initial, onset, stall = uniform, 0, "uniform"
        curve = np.full(len(t), uniform)
    elif kind == "scratch":
        curve = _decay_through(t, initial, floor, rng.uniform(0.02, 0.3) * total, unigram, rng)
    elif kind == "plateau":  # heads for the floor, stalls at the unigram level and stays
        onset, stall = int(rng.uniform(0.08, 0.4) * total), "unigram"
        heading = _decay_through(t, initial, floor, onset, unigram, rng)
        drift = rng.uniform(0.0, 0.02)
        curve = np.where(t < onset, heading, unigram * (1.0 - drift * (t - onset) / total))
    elif kind == "plateau_resolves":  # the same stall, until learning resumes
        onset, stall = int(rng.uniform(0.1, 0.3) * total), "unigram"
        dur = int(rng.uniform(250, 400))
        heading = _decay_through(t, initial, floor, onset, unigram, rng)
        later = _decay_through(np.maximum(t - dur, 0.0), initial, floor, onset, unigram, rng)
        curve = np.where(t < onset, heading, np.where(t < onset + dur, unigram, later))
        curve[onset + dur:] = np.minimum(curve[onset + dur:], unigram)
    else:
        raise ValueError(kind)
    refs = {"uniform": uniform, "unigram": unigram, "initial": float(curve[0])}
    return curve, refs, floor, onset, stall


def _fast_slow(t: np.ndarray, total: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Most of the drop in the first few percent of the run, then a slow decay that goes on
    (a LoRA SFT of a pretrained model)."""
    c = rng.uniform(0.3, 1.5)
    a = rng.uniform(1.0, 2.5)
    fast = rng.uniform(0.6, 0.85)
    tau = rng.uniform(0.01, 0.05) * total
    slow = (1.0 + t / rng.uniform(20, 200)) ** -rng.uniform(0.2, 0.5)
    return c + a * (fast * np.exp(-t / tau) + (1.0 - fast) * slow), c


def make_curve(kind: str, seed: int, *, max_steps: int | None = None, log_every: int = 1,
               heavy_tails: bool | None = None) -> Curve:
    """One labelled curve of ``kind`` (a healthy kind or an anomaly kind), deterministic per seed.

    The kinds older than the label revision draw their random numbers as before, so a seed gives
    the same curve; ``decay_flat`` is the former ``plateau`` (a decay that stops at a level it
    was not known to be stuck at), now healthy.
    """
    if kind not in HEALTHY_KINDS and kind not in ANOMALY_KINDS:
        raise ValueError(f"unknown curve kind {kind!r}")
    rng = np.random.default_rng(seed)
    shape_rng = np.random.default_rng([seed, 2])  # new kinds draw here: the old streams stay put
    ref_rng = np.random.default_rng([seed, 1])
    total = max_steps or int(rng.choice([1000, 2000, 3000]))
    t = np.arange(total, dtype=float)
    base_kind = kind if kind in _BASE_KINDS else str(rng.choice(["power", "exp", "warmup"]))
    if kind in ("plateau", "plateau_resolves", "decay_flat"):
        base_kind = str(rng.choice(["power", "exp"]))
    curve, lr, epochs, floor = _base(base_kind, t, total, rng)
    heavy = bool(rng.random() < 0.4) if heavy_tails is None else heavy_tails
    rel = rng.uniform(0.02, 0.08)
    if heavy:
        noise = rng.standard_t(4, total) / math.sqrt(2.0)
    else:
        noise = rng.standard_normal(total)
    labels: list[tuple[Reason, int]] = []
    vocab = int(ref_rng.choice(_LLM_VOCABS))
    refs = {"uniform": math.log(vocab), "unigram": math.log(vocab) * ref_rng.uniform(0.6, 0.75)}
    regime, stall, flat_from = "finetune", None, None
    if kind in SCRATCH_KINDS:
        regime = "scratch"
        curve, refs, floor, onset, stall = _scratch(kind, t, total, shape_rng)
        vocab = int(round(math.exp(refs["uniform"])))
        if onset >= 0:
            labels.append((Reason.EARLY_CONVERGENCE, onset))
            flat_from = onset
    elif kind == "fast_slow":
        curve, floor = _fast_slow(t, total, shape_rng)
    gn = rng.uniform(0.3, 3.0) * (0.5 + 0.5 * curve / curve[0]) * np.exp(0.2 * rng.standard_normal(total))

    if kind == "decay_flat":
        for _ in range(20):
            onset = int(rng.uniform(0.08, 0.4) * total)
            if curve[onset] - curve[-1] >= 0.15 * curve[onset]:
                break
            curve, lr, epochs, floor = _base(base_kind, t, total, rng)
        curve[onset:] = curve[onset]
        floor, flat_from = float(curve[onset]), onset
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
    elif kind == "zero_loss":  # every label masked: from the start, or from a bad shard on
        onset = 0 if shape_rng.random() < 0.5 else int(shape_rng.uniform(0.1, 0.7) * total)
        curve[onset:] = 0.0
        gn[onset:] = 0.0
        labels.append((Reason.ZERO_LOSS, onset))
    if regime == "finetune":
        refs["initial"] = float(curve[0])
        floor = float(min(floor, np.nanmin(curve[np.isfinite(curve)])))

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
                 noise="heavy" if heavy else "gauss", regime=regime, vocab_size=vocab,
                 references=refs, floor=float(floor), stall=stall, flat_from=flat_from)


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


SCORED = (Reason.SPIKE, Reason.DIVERGENCE, Reason.NONFINITE, Reason.EARLY_CONVERGENCE, Reason.ZERO_LOSS)


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


def max_latency(reason: Reason, log_every: int, max_steps: int) -> int:
    """How long after the labelled onset a finding still counts as detecting it, in steps."""
    k = log_every
    if reason == Reason.SPIKE:
        return 3 * k + 5
    if reason == Reason.NONFINITE:
        return k
    if reason == Reason.DIVERGENCE:
        return 600
    if reason == Reason.ZERO_LOSS:
        return 50 * k
    return max_steps // 2


def detect(curve: Curve, config: object | None = None) -> list[Finding]:
    """Every finding the full ``DetectorSuite`` makes on ``curve``, fed sample by sample as the
    callback feeds it."""
    from lossguard.signals.suite import DetectorSuite

    suite = DetectorSuite(config, max_steps=curve.max_steps)  # type: ignore[arg-type]
    found: list[Finding] = []
    for s in curve.samples:
        found.extend(suite.observe(s))
    return found


def score(curves: list[Curve], config: object | None = None,
          findings: list[list[Finding]] | None = None) -> dict[Reason, Score]:
    """Run the full ``DetectorSuite`` over each curve and score every detector against the labels.

    A finding matches a label of its reason when it is detected between the labelled onset and
    the reason's latency limit. Spike, grad and divergence findings after the onset of a
    divergence or a non-finite run are consequences of it, counted neither right nor wrong.
    ``findings`` (one list per curve, from ``detect``) saves running the suite again.
    """
    scores = {r: Score(r) for r in SCORED}
    for i, curve in enumerate(curves):
        found = findings[i] if findings is not None else detect(curve, config)
        healthy = curve.healthy
        catastrophic = [o for r, o in curve.labels if r in (Reason.DIVERGENCE, Reason.NONFINITE)]
        for reason, sc in scores.items():
            limit = max_latency(reason, curve.log_every, curve.max_steps)
            mine = [f for f in found if f.reason == reason]
            labels = [o for r, o in curve.labels if r == reason]
            if healthy:
                sc.healthy_runs += 1
                sc.healthy_findings += len(mine)
                sc.healthy_runs_alarmed += bool(mine)
            for onset in labels:
                sc.labels += 1
                hits = [f for f in mine if onset <= f.step <= onset + limit]
                if hits:
                    sc.detected += 1
                    sc.latencies.append(hits[0].step - onset)
            for f in mine:
                if any(o <= f.step <= o + limit for o in labels):
                    sc.matched += 1
                    sc.findings += 1
                elif not any(f.step >= o for o in catastrophic):
                    sc.findings += 1
    return scores
