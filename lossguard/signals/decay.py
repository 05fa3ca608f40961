"""Decay models fitted to a loss curve: what the curve so far says the loss should do next.

Two families with a free asymptote ``c`` (the loss the run is heading for):
exponential ``c + a*exp(-x/tau)`` and power law ``c + a*(x + x0)^-beta``. For each candidate
shape parameter the fit is linear in (c, a), so a grid of shapes is solved in one vectorised
weighted least-squares pass: no iterative optimiser, a few tens of microseconds per fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BETAS = np.geomspace(0.05, 2.0, 14)
_X0_FRACTIONS = np.array([0.0, 0.03, 0.1, 0.3])
_TAU_FRACTIONS = np.geomspace(0.03, 3.0, 32)


@dataclass(frozen=True)
class DecayFit:
    """One fitted curve: ``c + a * phi(x)`` with ``phi`` given by ``family`` and its shape."""

    family: str
    c: float
    a: float
    shape: float
    x0: float
    sse: float

    def predict(self, x: np.ndarray | float) -> np.ndarray | float:
        if self.family == "exp":
            return self.c + self.a * np.exp(-np.asarray(x, dtype=float) / self.shape)
        return self.c + self.a * (np.asarray(x, dtype=float) + self.x0) ** (-self.shape)


def _solve(phi: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares of y = c + a*phi for every row of ``phi``: (c, a, sse)."""
    sw = w.sum()
    my = (w * y).sum() / sw
    mphi = (phi * w).sum(axis=1) / sw
    dphi = phi - mphi[:, None]
    dy = y - my
    sff = (w * dphi * dphi).sum(axis=1)
    sfy = (w * dphi * dy).sum(axis=1)
    syy = (w * dy * dy).sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(sff > 0, sfy / sff, 0.0)
    c = my - a * mphi
    sse = syy - a * sfy
    return c, a, sse


def fit_decay(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> dict[str, DecayFit]:
    """Best decaying fit per family (``"exp"``, ``"power"``) to points ``(x, y)``, x >= 0.

    Only fits that decrease (``a > 0``) count; a family with none is absent from the result.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    w = np.ones_like(x) if w is None else np.asarray(w, dtype=float)
    span = max(float(x.max() - x.min()), 1.0)
    out: dict[str, DecayFit] = {}

    taus = _TAU_FRACTIONS * span
    phi = np.exp(-x[None, :] / taus[:, None])
    c, a, sse = _solve(phi, y, w)
    ok = a > 0
    if ok.any():
        i = int(np.argmin(np.where(ok, sse, np.inf)))
        out["exp"] = DecayFit("exp", float(c[i]), float(a[i]), float(taus[i]), 0.0, float(sse[i]))

    x0s = np.maximum(_X0_FRACTIONS * span, 1.0)
    betas = np.repeat(_BETAS, len(x0s))
    offs = np.tile(x0s, len(_BETAS))
    phi = (x[None, :] + offs[:, None]) ** (-betas[:, None])
    c, a, sse = _solve(phi, y, w)
    ok = a > 0
    if ok.any():
        i = int(np.argmin(np.where(ok, sse, np.inf)))
        out["power"] = DecayFit("power", float(c[i]), float(a[i]), float(betas[i]), float(offs[i]), float(sse[i]))
    return out
