"""Symmetric Lanczos with full reorthogonalization: both ends of a Hessian's spectrum in one run.

Thirty Hessian-vector products give the largest and the most negative curvature together, each
with a residual that says how far it can still be off. Power iteration cannot do this (it finds
the largest *magnitude*, and needs a second, shifted run for the other end, which converges
slowly when the negative curvature is small).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LanczosResult:
    """Ritz values (ascending) of the tridiagonal matrix after ``steps`` products.

    ``residuals[i]`` bounds the distance from ``ritz_values[i]`` to an eigenvalue of the operator.
    ``history`` holds ``(smallest, largest)`` Ritz values after each step.
    """

    ritz_values: np.ndarray
    residuals: np.ndarray
    steps: int
    stop_reason: str
    history: list[tuple[float, float]] = field(default_factory=list)
    min_vector: torch.Tensor | None = None
    max_vector: torch.Tensor | None = None


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    k = len(alphas)
    t = np.diag(np.asarray(alphas, dtype=np.float64))
    if k > 1:
        off = np.asarray(betas[: k - 1], dtype=np.float64)
        t += np.diag(off, 1) + np.diag(off, -1)
    return np.linalg.eigh(t)


def lanczos(
    matvec: MatVec,
    start: torch.Tensor,
    *,
    max_iter: int = 30,
    tol: float = 1e-3,
    min_steps: int = 20,
    max_seconds: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    want_vectors: bool = False,
) -> LanczosResult:
    """Run Lanczos on the symmetric operator ``matvec`` from ``start`` (any nonzero vector).

    Stops after ``max_iter`` products; earlier only when at least ``min_steps`` products are done
    and the residuals of both extreme Ritz values are ``<= tol * max|theta|``, when the Krylov
    space is exhausted (exact extremes), or when ``max_seconds`` is spent (after two products).
    The basis is kept in full (``max_iter`` vectors of ``start``'s size and dtype) and every new
    vector is orthogonalized against all of it twice, so no spurious copies of converged
    eigenvalues appear, in float32 too.
    """
    n = start.numel()
    max_iter = max(1, min(max_iter, n))
    basis = torch.empty((max_iter, n), dtype=start.dtype, device=start.device)
    q = start.reshape(-1) / torch.linalg.vector_norm(start)
    eps = torch.finfo(start.dtype).eps
    alphas: list[float] = []
    betas: list[float] = []
    history: list[tuple[float, float]] = []
    t0 = clock()
    stop_reason = "max_iter"
    theta = np.zeros(1)
    vecs = np.ones((1, 1))
    residuals = np.zeros(1)
    for j in range(max_iter):
        basis[j] = q
        w = matvec(q).reshape(-1).to(start.dtype)
        alpha = float(torch.dot(q, w))
        alphas.append(alpha)
        active = basis[: j + 1]
        for _ in range(2):
            w = w - active.T @ (active @ w)
        beta = float(torch.linalg.vector_norm(w))
        betas.append(beta)
        theta, vecs = _tridiagonal_eigh(alphas, betas)
        residuals = np.abs(beta * vecs[-1, :])
        history.append((float(theta[0]), float(theta[-1])))
        scale = float(np.max(np.abs(theta)))
        steps = j + 1
        if beta <= 1e3 * eps * max(scale, np.finfo(np.float64).tiny):
            stop_reason = "invariant_subspace"
            residuals = np.zeros_like(residuals)
            break
        if steps >= min_steps and max(residuals[0], residuals[-1]) <= tol * scale:
            stop_reason = "converged"
            break
        if max_seconds is not None and steps >= 2 and clock() - t0 >= max_seconds:
            stop_reason = "time"
            break
        q = w / beta
    steps = len(alphas)
    result = LanczosResult(
        ritz_values=theta, residuals=residuals, steps=steps, stop_reason=stop_reason, history=history
    )
    if want_vectors:
        used = basis[:steps]
        coef = torch.as_tensor(vecs, dtype=start.dtype, device=start.device)
        result.min_vector = used.T @ coef[:, 0]
        result.max_vector = used.T @ coef[:, -1]
    return result
