"""Decay models fitted to a loss curve: did it follow a decay until some step and stay flat since?

Two families with a free asymptote ``c`` (the loss the run is heading for):
exponential ``c + a*exp(-x/tau)`` and power law ``c + a*(x + x0)^-beta``. For each candidate
shape parameter the fit is linear in (c, a), so a grid of shapes, and every candidate onset of
a plateau, is solved in one vectorised weighted least-squares pass: no iterative optimiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_BETAS = np.geomspace(0.05, 2.0, 28)
_X0_FRACTIONS = np.array([0.0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.3, 0.6, 1.0])
_TAU_FRACTIONS = np.geomspace(0.03, 3.0, 64)
_ROWS = 64  # shapes per block in fit_kink


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
    grid = _grid(span)
    taus, betas, offs = grid
    shapes = [("exp", float(t), 0.0) for t in taus] + [("power", float(b), float(o)) for b, o in zip(betas, offs)]
    return shapes, _phi(x, grid, _logs(x, span))


def _offsets(span: float) -> np.ndarray:
    """The power-law offsets x0 for a span of ``span`` steps (at least 1, so x + x0 > 0)."""
    return np.maximum(_X0_FRACTIONS * max(float(span), 1.0), 1.0)


def _grid(span: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time constants, exponents, offsets), one entry per shape, for a span of ``span`` steps:
    the exponentials' time constants, then every (exponent, offset) pair of the power laws."""
    x0s = _offsets(span)
    return _TAU_FRACTIONS * max(float(span), 1.0), np.repeat(_BETAS, len(x0s)), np.tile(x0s, len(_BETAS))


def _logs(x: np.ndarray, span: float) -> np.ndarray:
    """``log(x + x0)`` for every power-law offset, one row each."""
    return np.log(x[None, :] + _offsets(span)[:, None])


def _phi(x: np.ndarray, grid: tuple[np.ndarray, np.ndarray, np.ndarray], logs: np.ndarray,
         lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Candidate shapes ``lo:hi`` of ``grid`` (all by default) at ``x``, one row each,
    exponentials first. Power laws are ``exp(-beta * log(x + x0))`` with the logs taken once per
    offset (``logs``): a power per value costs several times an exp."""
    taus, betas, _ = grid
    n_exp = len(taus)
    hi = n_exp + len(betas) if hi is None else hi
    rows = []
    if lo < n_exp:
        t = taus[lo:min(hi, n_exp)]
        rows.append(np.exp(-x[None, :] / t[:, None]))
    if hi > n_exp:
        k = np.arange(max(lo - n_exp, 0), min(hi - n_exp, len(betas)))
        rows.append(np.exp(-betas[k][:, None] * logs[k % len(_X0_FRACTIONS)]))
    return rows[0] if len(rows) == 1 else np.concatenate(rows)


def _shape(row: int, grid: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[str, float, float]:
    """(family, shape, x0) of row ``row`` of ``_phi``."""
    taus, betas, offs = grid
    if row < len(taus):
        return "exp", float(taus[row]), 0.0
    return "power", float(betas[row - len(taus)]), float(offs[row - len(taus)])


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
    span = float(x.max() - x.min())
    grid = _grid(span)
    n_shapes = len(grid[0]) + len(grid[1])
    W = float(w.sum())
    y0 = float((w * y).sum()) / W
    y = y - y0  # a constant added to phi or y changes no fit but, removed, keeps the sums precise
    Wy, Wyy = float((w * y).sum()), float((w * y * y).sum())
    syy = Wyy - Wy * Wy / W
    tail_w = W - np.cumsum(w)
    tail_wy = Wy - np.cumsum(w * y)
    cols = np.append(idx, len(x) - 1)  # the last column is the fit without a kink
    tw, twy = tail_w[cols], tail_wy[cols]
    best0 = math.inf
    best: tuple[float, int, int, float, float, float] | None = None  # sse, row, col, a, s1, mphi
    # shapes in blocks: arrays of a few tens of KB stay in cache (and below the size where
    # malloc maps fresh pages, whose faults cost more than the arithmetic)
    logs = _logs(x, span)
    for lo in range(0, n_shapes, _ROWS):
        phi = _phi(x, grid, logs, lo, lo + _ROWS)
        mphi = phi @ w / W
        phi = phi - mphi[:, None]
        wphi = phi * w
        f = phi[:, cols]
        s1 = np.cumsum(wphi, axis=1)[:, cols] + f * tw
        s2 = np.cumsum(wphi * phi, axis=1)[:, cols] + f * f * tw
        s3 = np.cumsum(wphi * y, axis=1)[:, cols] + f * twy
        sff = s2 - s1 * s1 / W
        sfy = s3 - s1 * Wy / W
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.where(sff > 1e-300, sfy / sff, 0.0)
        sse = np.where(a > 0, syy - a * sfy, np.inf)
        best0 = min(best0, float(sse[:, -1].min()))
        k = sse[:, :-1]
        s, t = np.unravel_index(int(np.argmin(k)), k.shape)
        if best is None or k[s, t] < best[0]:
            best = (float(k[s, t]), lo + int(s), int(t), float(a[s, t]), float(s1[s, t]), float(mphi[s]))
    if not math.isfinite(best0) or best is None or not math.isfinite(best[0]):
        return None
    sse_k, row, t, a_k, s1_k, mphi_k = best
    c = y0 + (Wy - a_k * s1_k) / W - a_k * mphi_k  # undo both centrings
    fam, shape, x0 = _shape(row, grid)
    decay = DecayFit(fam, float(c), a_k, shape, x0, sse_k)
    return KinkFit(tau=float(x[idx[t]]), gain=best0 - sse_k, sse=sse_k, decay=decay)
