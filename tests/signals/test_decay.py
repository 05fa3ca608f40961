"""The decay-then-flat (kink) fit, checked against plain least squares."""

from __future__ import annotations

import numpy as np
import pytest

from lossguard.signals.decay import basis, fit_kink


def _brute_kink(x, y, w, candidates):
    """Every (onset, shape) pair solved on its own with weighted least squares."""
    shapes, _ = basis(x, float(x.max() - x.min()))
    span = float(x.max() - x.min())

    def best(xx):
        _, phi = basis(xx, span)
        out = (np.inf, None)
        for s in range(len(shapes)):
            A = np.stack([np.ones_like(xx), phi[s]], axis=1) * np.sqrt(w)[:, None]
            coef, *_ = np.linalg.lstsq(A, y * np.sqrt(w), rcond=None)
            if coef[1] <= 0:
                continue
            sse = float((w * (y - coef[0] - coef[1] * phi[s]) ** 2).sum())
            if sse < out[0]:
                out = (sse, (s, coef))
        return out

    none, _ = best(x)
    kinks = [(best(np.minimum(x, x[j])), x[j]) for j in np.flatnonzero(candidates)]
    (sse, (s, coef)), tau = min(kinks, key=lambda k: k[0][0])
    return none - sse, sse, tau, shapes[s], coef


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kink_fit_equals_brute_force_least_squares(seed):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0, 800, 40))
    curve = 0.8 + 2.0 * (1 + x / 60) ** -0.7
    curve[x > 450] = 0.8 + 2.0 * (1 + 450 / 60) ** -0.7
    y = curve * (1 + 0.03 * rng.standard_normal(len(x)))
    w = rng.integers(1, 20, len(x)).astype(float)
    cand = (x > 100) & (x < 700)
    fit = fit_kink(x, y, w, cand)
    gain, sse, tau, shape, coef = _brute_kink(x, y, w, cand)
    assert fit is not None
    assert fit.tau == tau
    assert (fit.decay.family, fit.decay.shape, fit.decay.x0) == shape
    assert fit.sse == pytest.approx(sse, rel=1e-6, abs=1e-9)
    assert fit.gain == pytest.approx(gain, rel=1e-6, abs=1e-9)
    assert fit.decay.c == pytest.approx(coef[0], rel=1e-6)
    assert fit.decay.a == pytest.approx(coef[1], rel=1e-6)


def test_kink_found_near_the_true_onset_and_absent_on_a_healthy_decay():
    rng = np.random.default_rng(3)
    x = np.arange(5.0, 900.0, 10.0)
    decay = 1.0 + 2.0 * (1 + x / 50) ** -0.6
    flat = np.where(x > 500, 1.0 + 2.0 * (1 + 500 / 50) ** -0.6, decay)
    noise = 1 + 0.01 * rng.standard_normal(len(x))
    w = np.full(len(x), 10.0)
    cand = x > 50
    kinked = fit_kink(x, flat * noise, w, cand)
    healthy = fit_kink(x, decay * noise, w, cand)
    sigma2 = 10 * (0.01 * 1.3) ** 2  # weighted squared error per point the noise alone gives
    assert abs(kinked.tau - 500) <= 20
    assert kinked.gain / sigma2 > 100
    assert healthy.gain / sigma2 < 10
    d = kinked.decay
    level = float(d.predict(kinked.tau))
    assert level == pytest.approx(1.0 + 2.0 * (1 + 500 / 50) ** -0.6, rel=0.01)


def test_no_decay_no_fit():
    x = np.arange(0.0, 100.0, 5.0)
    rising = 1.0 + 0.01 * x
    assert fit_kink(x, rising, np.ones_like(x), x > 20) is None
    assert fit_kink(x, rising, np.ones_like(x), np.zeros(len(x), dtype=bool)) is None
