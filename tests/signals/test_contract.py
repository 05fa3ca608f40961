"""The detector contract, checked on every detector the suite holds (``suite.DETECTORS``): a new
detector registered there is held to it without a line here.

For each detector and each of a set of troubled streams (NaN, missing values, spikes, zero
losses, divergence, a premature plateau, an RL loss): it keeps the ``Detector`` protocol; the
batch path (``update_many``, cut at arbitrary rows) gives the streaming path's findings and
state; a JSON round trip of its state mid-stream gives the same future; an empty stretch changes
nothing.
"""

import json
import math

import numpy as np
import pytest

from lossguard.config import DetectionConfig
from lossguard.records import Columns, Finding, Reason, Sample
from lossguard.signals import suite as suite_module
from lossguard.signals.base import Detector, Stage, Suite
from lossguard.signals.references import Objective, References
from lossguard.signals.suite import DETECTORS, DetectorSuite, RunPlan
from lossguard.testing.synthetic import make_curve


def _noisy(seed: int, n: int = 1500) -> list[Sample]:
    """A decaying loss with loss and grad-norm spikes, a climb, gaps and a few NaN losses."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(1, n + 1):
        loss = 2.0 * (1 + i / 100) ** -0.3 + 0.05 * rng.standard_normal()
        gn = float(np.exp(0.3 * rng.standard_normal()))
        if rng.random() < 0.01:
            loss += 3.0
        if rng.random() < 0.01:
            gn *= 40
        if 700 <= i < 800:
            loss += (i - 700) * 0.01
        if rng.random() < 0.02:
            loss = None
        if rng.random() < 0.02:
            gn = None
        if rng.random() < 0.003:
            loss = math.nan
        out.append(Sample(step=i, loss=loss, grad_norm=gn, lr=1e-4 * min(1.0, i / 200) if i % 7 else None))
    return out


def _zeros() -> list[Sample]:
    """Masked labels (zero loss and grad norm), then vanishing grad norms, with gaps."""
    out = []
    for i in range(1, 400):
        loss, gn = 2.0, 1.0
        if 50 <= i < 120:
            loss, gn = 0.0, 0.0
        elif 200 <= i < 300:
            gn = 1e-9
        if i in range(100, 106) or i in range(250, 256):
            loss = gn = None
        out.append(Sample(step=i, loss=loss, grad_norm=gn))
    return out


def _rl(n: int = 600) -> list[Sample]:
    rng = np.random.default_rng(4)
    return [Sample(step=i + 1, loss=float(0.02 * rng.standard_normal()) - 0.01, grad_norm=0.5) for i in range(n)]


def _curve(kind: str, seed: int, every: int = 1) -> tuple[list[Sample], int | None]:
    curve = make_curve(kind, seed, log_every=every)
    return curve.samples, curve.max_steps


def _short_jump() -> list[Sample]:
    # a sparse log of ten values that jumps several-fold and stays (a QLoRA run at a bad LR)
    values = [2.1, 1.8, 1.6, 11.8, 11.7, 11.9, 11.8, math.nan, 11.7, 11.8]
    return [Sample(step=10 * (i + 1), loss=v, grad_norm=1.0) for i, v in enumerate(values)]


def _dpo() -> list[Sample]:
    """A DPO loss from ln 2: stuck there with a zero gradient, then worse than its reference, with gaps."""
    rng = np.random.default_rng(5)
    out = [Sample(step=i + 1, loss=math.log(2.0), grad_norm=0.0 if i % 3 else 5e-8) for i in range(30)]
    out += [Sample(step=i + 31, loss=float(0.7 + 0.5 * abs(rng.standard_normal())), grad_norm=2.0) for i in range(40)]
    out[40] = Sample(step=41, loss=math.nan, grad_norm=math.nan)
    return out


STREAMS = {
    "noisy": lambda: (_noisy(1), 1500),
    "short_jump": lambda: (_short_jump(), 1000),
    "zeros": lambda: (_zeros(), 400),
    "rl": lambda: (_rl(), 600),
    "nonfinite": lambda: _curve("nonfinite", 11),
    "spike_cluster": lambda: _curve("spike_cluster", 12),
    "divergence_slow": lambda: _curve("divergence_slow", 5),
    "divergence_fast_every_10": lambda: _curve("divergence_fast", 13, every=10),
    "plateau": lambda: _curve("plateau", 6),
    "stuck": lambda: _curve("stuck", 14),
    "dpo": lambda: (_dpo(), 200),
}
# the references a stream's run would have (the rest: none known)
REFERENCES = {"dpo": References(objective=Objective.PREFERENCE)}
NAMES = [reg.build(DetectionConfig(), RunPlan()).name for reg in DETECTORS]


def _make(index: int, max_steps: int | None, stream: str = "") -> Detector:
    det = DETECTORS[index].build(DetectionConfig(), RunPlan(max_steps=max_steps))
    if stream in REFERENCES and hasattr(det, "references"):
        det.references = REFERENCES[stream]
    return det


def _key(row: int, f: Finding) -> tuple:
    return (row, f.reason, f.severity, f.step, f.onset_step, f.message, f.detector)


def _stream(det: Detector, samples: list[Sample], start: int = 0) -> list[tuple]:
    out = []
    for i, s in enumerate(samples[start:], start):
        f = det.update(s)
        assert f is None or isinstance(f, Finding)
        if f is not None:
            out.append(_key(i, f))
    return out


def _state(det: Detector) -> str:
    return json.dumps(det.state_dict(), sort_keys=True)  # JSON-ready, or this raises


@pytest.mark.parametrize("index", range(len(DETECTORS)), ids=NAMES)
def test_every_detector_keeps_the_contract(index):
    fired = 0
    for name, make in STREAMS.items():
        samples, max_steps = make()
        det = _make(index, max_steps, name)
        assert isinstance(det, Detector) and det.name == NAMES[index]
        before = _state(det)
        assert det.update_many(Columns.from_samples([])) == [] and _state(det) == before  # empty input
        expected = _stream(det, samples)
        fired += bool(expected)

        # batch == streaming, across cuts (one of them a single row)
        many = _make(index, max_steps, name)
        cols = Columns.from_samples(samples)
        cuts = [0, 1, len(samples) // 3, len(samples)]
        got = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            got += [_key(a + i, f) for i, f in many.update_many(cols[a:b])]
        assert got == expected, name
        assert _state(many) == _state(det), name

        # a JSON round trip of the state mid-stream gives the same future
        half = len(samples) // 2
        first = _make(index, max_steps, name)
        _stream(first, samples[:half])
        clone = _make(index, None, name)
        clone.load_state_dict(json.loads(_state(first)))
        assert _state(clone) == _state(first), name
        rest = _stream(first, samples, half)
        assert _stream(clone, samples, half) == rest, name
        assert rest == [k for k in expected if k[0] >= half], name
        assert _state(clone) == _state(det), name

        # after a rollback the detector keeps working on the steps that follow the gap
        first.reset_after_rollback(samples[half].step)
        _stream(first, [Sample(step=s.step + 10_000, loss=s.loss, grad_norm=s.grad_norm, lr=s.lr)
                        for s in samples[half:]])
        json.loads(_state(first))
    assert fired >= 1, f"{NAMES[index]} found nothing on any stream: add one that shows its trouble"


def test_nan_infinite_and_missing_values_alone_never_break_a_detector():
    odd = [Sample(step=1), Sample(step=2, loss=math.nan, grad_norm=math.inf), Sample(step=3, loss=-math.inf),
           Sample(step=4, loss=1e308, grad_norm=1e308, lr=math.nan, epoch=math.nan), Sample(step=5, loss=2.0)]
    for index in range(len(DETECTORS)):
        det, many = _make(index, 10), _make(index, 10)
        expected = _stream(det, odd)
        with np.errstate(all="ignore"):
            got = [_key(i, f) for i, f in many.update_many(Columns.from_samples(odd))]
        assert got == expected and _state(many) == _state(det), NAMES[index]


def test_the_suite_keeps_the_engines_contract_and_holds_every_registered_detector():
    suite = DetectorSuite(max_steps=100)
    assert isinstance(suite, Suite)
    assert [d.name for d in suite.detectors] == NAMES and len(set(NAMES)) == len(NAMES)
    assert all(getattr(suite, name) is d for name, d in zip(NAMES, suite.detectors))
    assert suite.observe_many(Columns.from_samples([])) == [] and suite.samples_seen == 0


class _QuietSpikes:
    """A stage that holds back the spikes of a step that raised nothing else, counting them."""

    name = "quiet_spikes"

    def __init__(self, config: DetectionConfig, plan: RunPlan) -> None:
        self.held = 0

    def review(self, findings: list[Finding], step: int) -> list[Finding]:
        kept = [f for f in findings if f.reason is not Reason.SPIKE]
        self.held += len(findings) - len(kept)
        return kept

    def reset_after_rollback(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"held": self.held}

    def load_state_dict(self, state: dict) -> None:
        self.held = int(state["held"])


def test_a_registered_stage_reviews_every_steps_findings_online_and_offline_and_keeps_its_state(monkeypatch):
    samples, max_steps = STREAMS["spike_cluster"]()
    reference = DetectorSuite(max_steps=max_steps)
    plain = [f for s in samples for f in reference.observe(s)]
    monkeypatch.setattr(suite_module, "STAGES", (_QuietSpikes,))
    online, offline = DetectorSuite(max_steps=max_steps), DetectorSuite(max_steps=max_steps)
    assert isinstance(online.stages[0], Stage)
    found = [f for s in samples for f in online.observe(s)]
    assert any(f.reason is Reason.SPIKE for f in plain) and not any(f.reason is Reason.SPIKE for f in found)
    again = offline.observe_many(Columns.from_samples(samples))
    assert [f.to_record() for f in again] == [f.to_record() for f in found]
    state = json.loads(json.dumps(online.state_dict()))
    assert state["stages"] == {"quiet_spikes": {"held": online.stages[0].held}} and online.stages[0].held > 0
    fresh = DetectorSuite()
    fresh.load_state_dict(state)
    assert fresh.stages[0].held == online.stages[0].held
