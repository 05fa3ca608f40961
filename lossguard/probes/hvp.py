"""Hessian-vector products of a loss with respect to a list of parameters, without side effects.

Two ways to multiply by the Hessian:

* ``double_backward``: one ``autograd.grad(loss, params, create_graph=True)``; every product is a
  second backward through that one retained graph. Exact, about the cost of two backward passes.
* ``finite_difference``: ``(g(w + h v) - g(w - h v)) / 2h`` with two plain gradients. Works where
  double backward does not (reentrant gradient checkpointing, once-differentiable custom kernels,
  fused attention backward, quantized bases); less accurate (its step is calibrated on the first
  product, which costs a few more gradients), and it moves the parameters for the duration of
  each product (restored bit for bit afterwards).

``auto`` tries double backward and checks its first product against finite differences: some
unsupported ops raise, but others (``@once_differentiable`` functions, in torch 2.13) silently
drop their second-order terms, and a wrong Hessian would give a wrong verdict.

None of them touches ``.grad`` (a gradient taken with ``backward()``, the only way reentrant
checkpointing allows, is saved and restored), the optimizer, or the parameters' values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

LossFn = Callable[[], torch.Tensor]
METHODS = ("auto", "double_backward", "finite_difference")


def work_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype the solver works in: float64 if any parameter is, otherwise float32."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


class ParamSpace:
    """Flattens a list of parameter tensors into one vector and back."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.size = sum(self.numels)
        self.dtype = work_dtype(self.params)
        self.device = self.params[0].device

    def flatten(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        parts = [
            torch.zeros(n, dtype=self.dtype, device=self.device) if t is None else t.reshape(-1).to(self.dtype)
            for t, n in zip(tensors, self.numels, strict=True)
        ]
        return torch.cat(parts)

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for chunk, p in zip(torch.split(vec, self.numels), self.params, strict=True):
            out.append(chunk.reshape(p.shape).to(dtype=p.dtype, device=p.device))
        return out


class Gradient:
    """Plain gradients of ``loss_fn`` w.r.t. ``params``; falls back to ``backward()`` if needed.

    Reentrant checkpointing refuses ``autograd.grad``; then ``backward()`` is used with every
    parameter's ``.grad`` saved beforehand and put back afterwards.
    """

    def __init__(self, loss_fn: LossFn, space: ParamSpace):
        self.loss_fn = loss_fn
        self.space = space
        self.use_backward = False
        self.count = 0

    def __call__(self) -> torch.Tensor:
        self.count += 1
        if not self.use_backward:
            try:
                # no allow_unused: reentrant checkpointing shows up as "not used in the graph"
                grads = torch.autograd.grad(self.loss_fn(), self.space.params)
                return self.space.flatten(grads)
            except RuntimeError:
                self.use_backward = True
        return self._by_backward()

    def _by_backward(self) -> torch.Tensor:
        params = self.space.params
        saved = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            self.loss_fn().backward()
            return self.space.flatten([p.grad for p in params]).clone()
        finally:
            for p, g in zip(params, saved, strict=True):
                p.grad = g


class DoubleBackwardHVP:
    """Exact products through one retained double-backward graph (built on construction)."""

    method = "double_backward"

    def __init__(self, loss_fn: LossFn, space: ParamSpace):
        self.space = space
        self.count = 0
        loss = loss_fn()
        grads = torch.autograd.grad(loss, space.params, create_graph=True, allow_unused=True)
        self.loss_value = float(loss.detach())
        self.grad = space.flatten([None if g is None else g.detach() for g in grads])
        # A gradient without grad_fn is constant in the parameters (zero Hessian block) or, with a
        # once-differentiable op, silently wrong; the finite-difference check in auto mode tells.
        self._outputs = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        if not self._outputs:
            return torch.zeros_like(v)
        vs = self.space.unflatten(v)
        outs = [g for _, g in self._outputs]
        grad_outputs = [vs[i] for i, _ in self._outputs]
        hv = torch.autograd.grad(
            outs, self.space.params, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True
        )
        return self.space.flatten(hv)

    def close(self) -> None:
        self._outputs = []


class FiniteDifferenceHVP:
    """Central differences of plain gradients: ``(g(w + h v) - g(w - h v)) / 2h``.

    The step is calibrated on the first product. It starts at a perturbation of norm
    ``max(1e-3, eps**(1/3)) * (1 + |w|)`` and shrinks 4x at a time; the smallest step whose
    estimate agrees within ``rtol`` with the one before it is kept. The search goes on past
    disagreements that shrink (a feature narrower than the step appears only once the step is
    below its width, and two coarse steps that both straddle it agree with each other) and
    stops, after an agreement, at two growing ones in a row (rounding has taken over), or when
    the perturbation no longer changes the gradient. The smallest step matters: along a
    direction of sharp curvature the loss can bend on a far smaller scale than along a random
    one. On the demo's stalled LoRA adapter (|w| ~ 28) a random direction was within 1% at a
    perturbation of 0.035, but the most negative curvature direction needed ~1e-4 (at 0.14, the
    fixed step this replaces, its curvature came out -0.04 instead of -10.7). Every later
    product uses the calibrated perturbation norm.

    The parameters are moved in place (through ``.data``, so autograd's version counters do
    not change) and restored from a copy after every product, also when the loss raises.
    """

    method = "finite_difference"

    def __init__(self, loss_fn: LossFn, space: ParamSpace, *, rel_step: float | None = None,
                 rtol: float = 0.05, max_shrinks: int = 10):
        self.space = space
        self.gradient = Gradient(loss_fn, space)
        self.count = 0
        params = space.params
        self._saved = [p.detach().clone() for p in params]
        norm = math.sqrt(sum(float(torch.sum(s.double() ** 2)) for s in self._saved))
        eps = max(torch.finfo(p.dtype).eps for p in params)
        # 1e-3 rather than eps**(1/3) for float64: HF models compute the loss (and RoPE) in
        # float32 whatever the parameter dtype, so their gradients carry float32 rounding
        self.rel_step = rel_step if rel_step is not None else max(1e-3, eps ** (1.0 / 3.0))
        self._w_norm = norm
        self.rtol = rtol
        self.max_shrinks = max_shrinks
        self.step: float | None = None  # the perturbation's norm, once calibrated

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v_norm = float(torch.linalg.vector_norm(v))
        if v_norm == 0.0:
            self.count += 1
            return torch.zeros_like(v)
        if self.step is None:
            return self.calibrate(v)
        return self._product(v, self.step / v_norm)

    def calibrate(self, v: torch.Tensor, *, agree_with: torch.Tensor | None = None,
                  rtol: float = 0.0) -> torch.Tensor:
        """The product with ``v`` at the calibrated step (which later products then use).

        With ``agree_with`` (another method's product) the search stops as soon as an estimate
        is within ``rtol`` of it: that method is confirmed, and this one need not be exact.
        """
        v_norm = float(torch.linalg.vector_norm(v))
        step = self.rel_step * (1.0 + self._w_norm)
        est = self._product(v, step / v_norm)
        best: tuple[float, torch.Tensor] | None = None  # the smallest step that agreed with the one before
        closest = (math.inf, step, est)  # failing that, the pair that came closest
        misses, last = 0, math.inf  # disagreements in a row that grew, the last difference
        for _ in range(self.max_shrinks):
            if agree_with is not None and _rel_diff(est, agree_with) <= rtol:
                best = (step, est)
                break
            smaller = step / 4.0
            nxt = self._product(v, smaller / v_norm)
            if not bool(torch.isfinite(nxt).all()) or not bool(torch.any(nxt != 0)):
                break  # the perturbation no longer moves the parameters (or the loss broke)
            diff = _rel_diff(nxt, est)
            step, est = smaller, nxt
            if diff <= self.rtol:
                best, misses = (step, est), 0
            else:
                misses = misses + 1 if diff > last else 0
                if best is not None and misses >= 2:
                    break  # the estimates drift apart as the step shrinks: rounding has taken over
            last = diff
            if diff < closest[0]:
                closest = (diff, step, est)
        self.step, est = best if best is not None else closest[1:]
        return est

    def _product(self, v: torch.Tensor, h: float) -> torch.Tensor:
        self.count += 1
        try:
            self._shift(v, h)
            g_plus = self.gradient()
            self._shift(v, -h)
            g_minus = self.gradient()
        finally:
            self._restore()
        return (g_plus - g_minus) / (2.0 * h)

    def _shift(self, v: torch.Tensor, h: float) -> None:
        with torch.no_grad():
            for p, s, d in zip(self.space.params, self._saved, self.space.unflatten(v), strict=True):
                p.data.copy_(s + h * d.to(s.dtype))

    def _restore(self) -> None:
        with torch.no_grad():
            for p, s in zip(self.space.params, self._saved, strict=True):
                p.data.copy_(s)

    def close(self) -> None:
        self._saved = []


class AutoHVP:
    """Double backward, checked once against finite differences; finite differences if it fails.

    The first product is computed both ways. Double backward is kept when a finite difference
    agrees with it within ``check_rtol`` (relative to the larger of the two products), trying
    steps from coarse to as fine as rounding allows (a coarse step can miss sharp curvature that
    double backward gets right); otherwise, or when double backward raises, every later product
    uses finite differences at the calibrated step. ``fallback_reason`` says why.
    """

    def __init__(self, loss_fn: LossFn, space: ParamSpace, *, check_rtol: float = 0.05):
        self.space = space
        self.loss_fn = loss_fn
        self.check_rtol = check_rtol
        self.fallback_reason: str | None = None
        self.check_error: float | None = None
        self.fd = FiniteDifferenceHVP(loss_fn, space)
        self.db: DoubleBackwardHVP | None = None
        try:
            self.db = DoubleBackwardHVP(loss_fn, space)
        except RuntimeError as err:
            self.fallback_reason = f"double backward failed: {_first_line(err)}"
        self._checked = self.db is None

    @property
    def method(self) -> str:
        return "double_backward" if self.db is not None else "finite_difference"

    @property
    def count(self) -> int:
        return self.fd.count + (self.db.count if self.db is not None else 0)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self._checked:
            return self.db(v) if self.db is not None else self.fd(v)
        self._checked = True
        assert self.db is not None
        try:
            exact = self.db(v)
        except RuntimeError as err:
            self._drop_db(f"double backward failed: {_first_line(err)}")
            return self.fd(v)
        # finite differences as fine as rounding allows, unless a coarser step already agrees
        approx = self.fd.calibrate(v, agree_with=exact, rtol=self.check_rtol)
        self.check_error = _rel_diff(exact, approx)
        if self.check_error > self.check_rtol:
            self._drop_db(
                f"double backward differs from finite differences by {self.check_error:.1%} "
                f"(> {self.check_rtol:.0%}): some op is not twice differentiable"
            )
            return approx
        return exact

    def _drop_db(self, reason: str) -> None:
        self.fallback_reason = reason
        if self.db is not None:
            self.db.close()
        self.db = None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.fd.close()


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b|`` relative to the larger of ``|a|`` and ``|b|`` (0 when both are zero)."""
    scale = max(float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b)))
    return float(torch.linalg.vector_norm(a - b)) / scale if scale > 0 else 0.0


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def make_hvp(
    loss_fn: LossFn, params: Sequence[torch.Tensor], method: str = "auto"
) -> DoubleBackwardHVP | FiniteDifferenceHVP | AutoHVP:
    """The Hessian-vector product operator for ``method`` (one of ``METHODS``)."""
    space = ParamSpace(params)
    if method == "double_backward":
        return DoubleBackwardHVP(loss_fn, space)
    if method == "finite_difference":
        return FiniteDifferenceHVP(loss_fn, space)
    if method == "auto":
        return AutoHVP(loss_fn, space)
    raise ValueError(f"hvp={method!r}; allowed {', '.join(METHODS)}")
