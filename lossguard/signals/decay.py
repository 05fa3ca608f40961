"""Decay models fitted to a loss curve: did it follow a decay until some step and stay flat since?

Two families with a free asymptote ``c`` (the loss the run is heading for):
exponential ``c + a*exp(-x/tau)`` and power law ``c + a*(x + x0)^-beta``. For each candidate
shape parameter the fit is linear in (c, a), so a grid of shapes, and every candidate onset of
a plateau, is solved in one vectorised weighted least-squares pass: no iterative optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BETAS = np.geomspace(0.05, 2.0, 28)
_X0_FRACTIONS = np.array([0.0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.3, 0.6, 1.0])
_TAU_FRACTIONS = np.geomspace(0.03, 3.0, 64)


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


def basis(x: np.ndarray, span: float) -> tuple[list[tuple[str, float, float]], np.ndarray]:
    """Every candidate shape for data spanning ``span`` steps, and its ``phi`` at ``x`` (one row each).

    Shapes are (family, shape, x0): exponential time constants from 3% to 3x the span, power-law
    exponents 0.05-2 with offsets of 0-100% of the span. The grid is fine enough that a healthy
    decay is not left with a misfit that a kink could explain (the coarser grid of 14 x 4 x 32
    shapes did, on 4 of 450 healthy runs).
    """
    span = max(float(span), 1.0)
    taus = _TAU_FRACTIONS * span
    x0s = np.maximum(_X0_FRACTIONS * span, 1.0)
    betas = np.repeat(_BETAS, len(x0s))
    offs = np.tile(x0s, len(_BETAS))
    shapes = [("exp", float(t), 0.0) for t in taus] + [("power", float(b), float(o)) for b, o in zip(betas, offs)]
    phi = np.concatenate([np.exp(-x[None, :] / taus[:, None]), (x[None, :] + offs[:, None]) ** (-betas[:, None])])
    return shapes, phi


@dataclass(frozen=True)
class KinkFit:
    """The loss followed a decay up to ``tau`` and has been flat at its value since.

    ``gain`` is how much better (weighted squared error) that fits than the best decay through
    all of the data: the evidence for a kink at ``tau``.
    """

    tau: float
    gain: float
    sse: float
    decay: DecayFit


def fit_kink(x: np.ndarray, y: np.ndarray, w: np.ndarray, candidates: np.ndarray) -> KinkFit | None:
    """The best decay-then-flat fit, the kink after one of the points ``candidates`` (a boolean
    mask over the points, which are in increasing x), against the best decay without a kink.
    None when no decaying fit exists.

    For a kink after point j every sum the least-squares fit needs is a prefix sum up to j plus
    phi(x_j) times a suffix sum, so all kinks and shapes cost one pass over the data.
    """
    idx = np.flatnonzero(candidates)
    if len(idx) == 0 or len(x) < 5:
        return None
    shapes, phi = basis(x, float(x.max() - x.min()))
    # a constant added to phi or y changes no fit but, removed, keeps the sums below precise
    mphi = phi @ w / w.sum()
    phi = phi - mphi[:, None]
    y0 = float((w * y).sum() / w.sum())
    y = y - y0
    W, Wy, Wyy = float(w.sum()), float((w * y).sum()), float((w * y * y).sum())
    wphi = phi * w
    p1 = np.cumsum(wphi, axis=1)
    p2 = np.cumsum(wphi * phi, axis=1)
    p3 = np.cumsum(wphi * y, axis=1)
    tail_w = W - np.cumsum(w)
    tail_wy = Wy - np.cumsum(w * y)
    cols = np.append(idx, len(x) - 1)  # the last column is the fit without a kink
    f = phi[:, cols]
    s1 = p1[:, cols] + f * tail_w[cols]
    s2 = p2[:, cols] + f * f * tail_w[cols]
    s3 = p3[:, cols] + f * tail_wy[cols]
    sff = s2 - s1 * s1 / W
    sfy = s3 - s1 * Wy / W
    syy = Wyy - Wy * Wy / W
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(sff > 1e-300, sfy / sff, 0.0)
    sse = np.where(a > 0, syy - a * sfy, np.inf)
    best0 = float(sse[:, -1].min())
    if not np.isfinite(best0):
        return None
    k = sse[:, :-1]
    s, t = np.unravel_index(int(np.argmin(k)), k.shape)
    if not np.isfinite(k[s, t]):
        return None
    c = y0 + (Wy - a[s, t] * s1[s, t]) / W - a[s, t] * mphi[s]  # undo both centrings
    fam, shape, x0 = shapes[s]
    decay = DecayFit(fam, float(c), float(a[s, t]), shape, x0, float(k[s, t]))
    return KinkFit(tau=float(x[idx[t]]), gain=best0 - float(k[s, t]), sse=float(k[s, t]), decay=decay)
