"""Symmetric Lanczos with full reorthogonalization: both ends of a Hessian's spectrum in one run.

Thirty Hessian-vector products give the largest and the most negative curvature together, each
with a residual that says how far it can still be off. Power iteration cannot do this (it finds
the largest *magnitude*, and needs a second, shifted run for the other end, which converges
slowly when the negative curvature is small).

The basis (one vector per product, the size of the trainable parameters) can live off the
device (``basis_device="cpu"``) and in bfloat16 (``basis_dtype``): the new vector is then
reorthogonalized where the basis lives, in the working precision, a few rows at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lossguard.probes.deadline import BudgetSpent, Deadline

MatVec = Callable[[torch.Tensor], torch.Tensor]
CHUNK_BYTES = 64 * 2**20  # rows of a converted (or moved) basis held at once


@dataclass
class LanczosResult:
    """Ritz values (ascending) of the tridiagonal matrix after ``steps`` products.

    ``residuals[i]`` bounds the distance from ``ritz_values[i]`` to an eigenvalue of the operator.
    ``history`` holds ``(smallest, largest)`` Ritz values after each step. ``steps`` is 0 (and the
    arrays empty) when the time ran out before the first product was done.
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


def unit(start: torch.Tensor) -> torch.Tensor:
    """The first Lanczos vector: ``start`` flattened and normalised (products of it can be reused)."""
    flat = start.reshape(-1)
    return flat / torch.linalg.vector_norm(flat)


class Basis:
    """The Lanczos vectors, stored where and how the caller can afford them."""

    def __init__(self, rows: int, like: torch.Tensor, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.work_dtype, self.work_device = like.dtype, like.device
        self.device = torch.device(device) if device is not None else like.device
        self.dtype = dtype or like.dtype
        n = like.numel()
        self.data = torch.empty((rows, n), dtype=self.dtype, device=self.device)
        self.direct = self.dtype == self.work_dtype and self.device == self.work_device
        self.chunk = max(1, CHUNK_BYTES // max(1, n * like.element_size()))

    def put(self, j: int, q: torch.Tensor) -> None:
        self.data[j].copy_(q)

    def _blocks(self, k: int):
        for a in range(0, k, self.chunk):
            b = min(k, a + self.chunk)
            yield a, b, self.data[a:b].to(self.work_dtype)

    def orthogonalize(self, w: torch.Tensor, k: int) -> torch.Tensor:
        """``w`` minus its components along the first ``k`` vectors, twice (classical Gram-Schmidt)."""
        if self.direct:
            active = self.data[:k]
            for _ in range(2):
                w = w - active.T @ (active @ w)
            return w
        x = w.to(self.device)
        for _ in range(2):
            coef = torch.cat([rows @ x for _, _, rows in self._blocks(k)])
            for a, b, rows in self._blocks(k):
                x = x - rows.T @ coef[a:b]
        return x.to(self.work_device)

    def combine(self, k: int, coef: torch.Tensor) -> torch.Tensor:
        """``sum_i coef[i] * basis[i]`` over the first ``k`` vectors, in the working precision."""
        if self.direct:
            return self.data[:k].T @ coef.to(self.device)
        c = coef.to(self.device, self.work_dtype)
        out = torch.zeros(self.data.shape[1], dtype=self.work_dtype, device=self.device)
        for a, b, rows in self._blocks(k):
            out += rows.T @ c[a:b]
        return out.to(self.work_device)


class RecentPair:
    """No stored basis: the three-term recurrence, each new vector reorthogonalized against the
    last two only. Memory: two vectors instead of one per product. In finite precision the
    vectors lose orthogonality once a Ritz value converges, which adds spurious copies of
    converged values but leaves the extreme ones accurate: on the exact tests (quadratics, an
    MLP, a LoRA Llama) both ends came within 0.05% of |lambda_max| by 20 products, as with the
    full basis. No Ritz vectors can be formed."""

    def __init__(self, like: torch.Tensor) -> None:
        self.rows: list[torch.Tensor] = []

    def put(self, j: int, q: torch.Tensor) -> None:
        self.rows = [*self.rows[-1:], q]

    def orthogonalize(self, w: torch.Tensor, k: int) -> torch.Tensor:
        for _ in range(2):
            for q in self.rows:
                w = w - torch.dot(q, w) * q
        return w


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
    deadline: Deadline | None = None,
    first_product: torch.Tensor | None = None,
    basis_device: torch.device | str | None = None,
    basis_dtype: torch.dtype | None = None,
    keep_basis: bool = True,
) -> LanczosResult:
    """Run Lanczos on the symmetric operator ``matvec`` from ``start`` (any nonzero vector).

    Stops after ``max_iter`` products; earlier only when at least ``min_steps`` products are done
    and the residuals of both extreme Ritz values are ``<= tol * max|theta|``, when the Krylov
    space is exhausted (exact extremes), or on time: before a product when the last step's
    duration no longer fits before the deadline (``deadline``, or ``max_seconds`` from now), and
    when ``matvec`` raises ``BudgetSpent`` (the partial product is dropped). ``first_product``
    is ``matvec(unit(start))`` when the caller already has it.

    The basis (``max_iter`` vectors) is kept in full and every new vector is orthogonalized
    against all of it twice, so no spurious copies of converged eigenvalues appear, in float32
    too; it is stored on ``basis_device`` in ``basis_dtype`` (default: ``start``'s). Without
    ``keep_basis`` only the last two vectors are kept (``RecentPair``; no ``want_vectors``).
    """
    n = start.numel()
    max_iter = max(1, min(max_iter, n))
    if deadline is None and max_seconds is not None:
        deadline = Deadline(max_seconds, clock)
    if not keep_basis and want_vectors:
        raise ValueError("want_vectors needs the basis; pass keep_basis=True")
    basis: Basis | RecentPair = (
        Basis(max_iter, start.reshape(-1), device=basis_device, dtype=basis_dtype) if keep_basis
        else RecentPair(start)
    )
    q = unit(start)
    eps = torch.finfo(start.dtype).eps
    alphas: list[float] = []
    betas: list[float] = []
    history: list[tuple[float, float]] = []
    stop_reason = "max_iter"
    theta = np.zeros(0)
    vecs = np.ones((0, 0))
    residuals = np.zeros(0)
    last_step: float | None = None
    reused = first_product is not None
    for j in range(max_iter):
        if deadline is not None and j > 0 and last_step is not None and deadline.left() < last_step:
            stop_reason = "time"  # the next step would end past the deadline
            break
        t_step = clock()
        try:
            w = first_product if j == 0 and reused else matvec(q)
            first_product = None
        except BudgetSpent:
            stop_reason = "time"
            break
        basis.put(j, q)
        w = w.reshape(-1).to(start.dtype)
        alpha = float(torch.dot(q, w))
        alphas.append(alpha)
        w = basis.orthogonalize(w, j + 1)
        beta = float(torch.linalg.vector_norm(w))
        betas.append(beta)
        theta, vecs = _tridiagonal_eigh(alphas, betas)
        residuals = np.abs(beta * vecs[-1, :])
        history.append((float(theta[0]), float(theta[-1])))
        scale = float(np.max(np.abs(theta)))
        steps = j + 1
        last_step = None if j == 0 and reused else clock() - t_step
        if beta <= 1e3 * eps * max(scale, np.finfo(np.float64).tiny):
            stop_reason = "invariant_subspace"
            residuals = np.zeros_like(residuals)
            break
        if steps >= min_steps and max(residuals[0], residuals[-1]) <= tol * scale:
            stop_reason = "converged"
            break
        if deadline is not None and deadline.left() <= 0:
            stop_reason = "time"
            break
        q = w / beta
    steps = len(alphas)
    result = LanczosResult(
        ritz_values=theta, residuals=residuals, steps=steps, stop_reason=stop_reason, history=history
    )
    if want_vectors and steps and isinstance(basis, Basis):
        coef = torch.as_tensor(vecs, dtype=start.dtype)
        result.min_vector = basis.combine(steps, coef[:, 0])
        result.max_vector = basis.combine(steps, coef[:, -1])
    return result
