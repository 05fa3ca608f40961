"""Hessian-vector products of a loss with respect to a list of parameters, without side effects.

The loss may come in pieces, one per training micro-batch: ``sum(piece.weight * piece.fn())``
(for a language model, each micro-batch weighted by its share of the label tokens). A product is
linear in the loss, so it is computed piece by piece, each piece's graph freed before the next:
the memory of a product is one micro-batch's, whatever the number of sequences probed. With a
``Deadline`` the clock is read before every piece.

Two ways to multiply by the Hessian:

* ``double_backward``: ``autograd.grad(loss, params, create_graph=True)`` then a second backward
  through it. Exact. With a single piece the graph is built once and kept for every product;
  with several it is rebuilt per piece and product (the forward and first backward again, about
  a sixth more time on a 26M-parameter Llama on CPU) so that only one piece's graph lives at once.
* ``finite_difference``: ``(g(w + h v) - g(w - h v)) / 2h`` with two plain gradients. Works where
  double backward does not (reentrant gradient checkpointing, once-differentiable custom kernels,
  fused attention backward, quantized bases), and runs the model's own (fused) kernels; less
  accurate (its step is calibrated, which costs a few more gradients), and it moves the
  parameters for the duration of each product (restored bit for bit afterwards).

Which one a probe uses, and why, is decided by ``probes.hvp_choice.choose_method``.

None of them touches ``.grad`` (a gradient taken with ``backward()``, the only way reentrant
checkpointing allows, is saved and restored), the optimizer, or the parameters' values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lossguard.probes.deadline import BudgetSpent, Deadline

LossFn = Callable[[], torch.Tensor]
METHODS = ("auto", "double_backward", "finite_difference")
GUESS_SHRINK = 64.0


@dataclass(frozen=True)
class LossPiece:
    """One micro-batch's share of the probed loss: ``weight * fn()``.

    ``twice`` computes the same loss through twice-differentiable kernels (PyTorch's math
    attention, say) for double backward; ``fn`` may use fused kernels, which finite differences
    can use since they need plain gradients only.
    """

    fn: LossFn
    weight: float = 1.0
    twice: LossFn | None = None

    @property
    def exact_fn(self) -> LossFn:
        return self.fn if self.twice is None else self.twice


def as_pieces(loss: LossFn | Sequence[LossPiece]) -> list[LossPiece]:
    """A plain loss callable is one piece of weight 1."""
    if callable(loss):
        return [LossPiece(loss)]
    pieces = list(loss)
    if not pieces:
        raise ValueError("the loss has no pieces; pass a callable or at least one LossPiece")
    return pieces


def is_fatal(err: BaseException) -> bool:
    """Errors no fallback may swallow: the budget is spent, or memory ran out."""
    return isinstance(err, (BudgetSpent, torch.OutOfMemoryError))


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

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.size, dtype=self.dtype, device=self.device)

    def add_into(self, acc: torch.Tensor, tensors: Sequence[torch.Tensor | None], alpha: float) -> None:
        """``acc += alpha * flatten(tensors)`` without a flattened copy (``None`` counts as zero)."""
        for chunk, t in zip(torch.split(acc, self.numels), tensors, strict=True):
            if t is not None:
                chunk.add_(t.reshape(-1).to(self.dtype), alpha=alpha)

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


def _check(deadline: Deadline | None) -> None:
    if deadline is not None:
        deadline.check()


class Gradient:
    """Plain gradients of the pieced loss w.r.t. the parameters; falls back to ``backward()``.

    Reentrant checkpointing refuses ``autograd.grad``; then ``backward()`` is used with every
    parameter's ``.grad`` saved beforehand and put back afterwards. ``count`` counts the
    micro-batch gradients taken.
    """

    def __init__(self, loss: LossFn | Sequence[LossPiece], space: ParamSpace, *,
                 deadline: Deadline | None = None):
        self.pieces = as_pieces(loss)
        self.space = space
        self.deadline = deadline
        self.use_backward = False
        self.count = 0

    def __call__(self) -> torch.Tensor:
        acc = self.space.zeros()
        self.accumulate(acc, 1.0)
        return acc

    def accumulate(self, acc: torch.Tensor, sign: float) -> None:
        """``acc += sign * gradient``, one piece at a time."""
        for piece in self.pieces:
            _check(self.deadline)
            self._one(piece.fn, acc, sign * piece.weight)

    def _one(self, loss_fn: LossFn, acc: torch.Tensor, alpha: float) -> None:
        self.count += 1
        if not self.use_backward:
            try:
                # no allow_unused: reentrant checkpointing shows up as "not used in the graph"
                grads = torch.autograd.grad(loss_fn(), self.space.params)
                self.space.add_into(acc, grads, alpha)
                return
            except RuntimeError as err:
                if is_fatal(err):
                    raise
                self.use_backward = True
        self._by_backward(loss_fn, acc, alpha)

    def _by_backward(self, loss_fn: LossFn, acc: torch.Tensor, alpha: float) -> None:
        params = self.space.params
        saved = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            loss_fn().backward()
            self.space.add_into(acc, [p.grad for p in params], alpha)
        finally:
            for p, g in zip(params, saved, strict=True):
                p.grad = g


class DoubleBackwardHVP:
    """Exact products by double backward, micro-batch by micro-batch.

    With ``retain`` (the default for a single piece) each piece's graph is built on construction
    and kept for every product; otherwise it is rebuilt for each piece and product and freed
    before the next piece. ``loss_value`` is the weighted loss seen on the first pass.
    """

    method = "double_backward"

    def __init__(self, loss: LossFn | Sequence[LossPiece], space: ParamSpace, *,
                 deadline: Deadline | None = None, retain: bool | None = None):
        self.pieces = as_pieces(loss)
        self.space = space
        self.deadline = deadline
        self.retain = len(self.pieces) == 1 if retain is None else retain
        self.count = 0
        self.loss_value: float | None = None
        self._loss_sum = 0.0
        self._graphs: list[list[tuple[int, torch.Tensor]]] = []
        if self.retain:
            for piece in self.pieces:
                _check(deadline)
                self._graphs.append(self._build(piece))
            self.loss_value = self._loss_sum

    def _build(self, piece: LossPiece) -> list[tuple[int, torch.Tensor]]:
        loss = piece.exact_fn()
        grads = torch.autograd.grad(loss, self.space.params, create_graph=True, allow_unused=True)
        self._loss_sum += piece.weight * float(loss.detach())
        # A gradient without grad_fn is constant in the parameters (zero Hessian block) or, with a
        # once-differentiable op, silently wrong; the finite-difference check in auto mode tells.
        return [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def _second(self, outputs: list[tuple[int, torch.Tensor]], vs: list[torch.Tensor], retain: bool,
                acc: torch.Tensor, weight: float) -> None:
        if not outputs:
            return
        hv = torch.autograd.grad(
            [g for _, g in outputs], self.space.params, grad_outputs=[vs[i] for i, _ in outputs],
            retain_graph=retain, allow_unused=True,
        )
        self.space.add_into(acc, hv, weight)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        vs = self.space.unflatten(v)
        acc = self.space.zeros()
        if self.retain:
            for piece, outputs in zip(self.pieces, self._graphs, strict=True):
                _check(self.deadline)
                self._second(outputs, vs, True, acc, piece.weight)
            return acc
        first = self.loss_value is None
        for piece in self.pieces:
            _check(self.deadline)
            outputs = self._build(piece)
            self._second(outputs, vs, False, acc, piece.weight)
            del outputs
        if first:
            self.loss_value = self._loss_sum
        return acc

    def close(self) -> None:
        self._graphs = []


class FiniteDifferenceHVP:
    """Central differences of plain gradients: ``(g(w + h v) - g(w - h v)) / 2h``.

    The step is calibrated on the first product (or given as ``step``, a perturbation norm
    calibrated elsewhere). It starts at a perturbation of norm ``max(1e-3, eps**(1/3)) * (1 +
    |w|)`` and shrinks 4x at a time; the smallest step whose estimate agrees within ``rtol`` with
    the one before it is kept. The search goes on past disagreements that shrink (a feature
    narrower than the step appears only once the step is below its width, and two coarse steps
    that both straddle it agree with each other) and stops, after an agreement, at two growing
    ones in a row (rounding has taken over), or when the perturbation no longer changes the
    gradient. The smallest step matters: along a direction of sharp curvature the loss can bend
    on a far smaller scale than along a random one. On the demo's stalled LoRA adapter (|w| ~ 28)
    a random direction was within 1% at a perturbation of 0.035, but the most negative curvature
    direction needed ~1e-4 (at 0.14, the fixed step this replaces, its curvature came out -0.04
    instead of -10.7). Every later product uses the calibrated perturbation norm.

    The parameters are moved in place (through ``.data``, so autograd's version counters do
    not change) and restored from a copy after every product, also when the loss raises or the
    deadline passes between the two gradients.
    """

    method = "finite_difference"

    def __init__(self, loss: LossFn | Sequence[LossPiece], space: ParamSpace, *, rel_step: float | None = None,
                 rtol: float = 0.05, max_shrinks: int = 10, step: float | None = None,
                 deadline: Deadline | None = None):
        self.space = space
        self.gradient = Gradient(loss, space, deadline=deadline)
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
        self.step: float | None = step  # the perturbation's norm, once calibrated

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v_norm = float(torch.linalg.vector_norm(v))
        if v_norm == 0.0:
            self.count += 1
            return torch.zeros_like(v)
        if self.step is None:
            return self.calibrate(v)
        return self._product(v, self.step / v_norm)

    def calibrate(self, v: torch.Tensor, *, agree_with: torch.Tensor | None = None, rtol: float = 0.0,
                  start: tuple[float, torch.Tensor] | None = None) -> torch.Tensor:
        """The product with ``v`` at the calibrated step (which later products then use).

        With ``agree_with`` (another method's product) the search stops as soon as an estimate
        is within ``rtol`` of it: that method is confirmed, and this one need not be exact. A
        step ``GUESS_SHRINK`` times finer than the coarse start is tried first, where most models
        agree (a 26M-parameter Llama needed four shrinks, five products at a few training steps
        each); when it does not, the search runs from the coarse start as usual.
        ``start`` (a perturbation norm and its estimate) resumes a search from there.
        """
        v_norm = float(torch.linalg.vector_norm(v))
        if start is None and agree_with is not None:
            guess = self.rel_step * (1.0 + self._w_norm) / GUESS_SHRINK
            est = self._product(v, guess / v_norm)
            if bool(torch.isfinite(est).all()) and rel_diff(est, agree_with) <= rtol:
                self.step = guess
                return est
        if start is None:
            step = self.rel_step * (1.0 + self._w_norm)
            est = self._product(v, step / v_norm)
        else:
            step, est = start
        best: tuple[float, torch.Tensor] | None = None  # the smallest step that agreed with the one before
        closest = (math.inf, step, est)  # failing that, the pair that came closest
        misses, last = 0, math.inf  # disagreements in a row that grew, the last difference
        for _ in range(self.max_shrinks):
            if agree_with is not None and rel_diff(est, agree_with) <= rtol:
                best = (step, est)
                break
            smaller = step / 4.0
            nxt = self._product(v, smaller / v_norm)
            if not bool(torch.isfinite(nxt).all()) or not bool(torch.any(nxt != 0)):
                break  # the perturbation no longer moves the parameters (or the loss broke)
            diff = rel_diff(nxt, est)
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
        acc = self.space.zeros()
        try:
            self._shift(v, h)
            self.gradient.accumulate(acc, 1.0)
            self._shift(v, -h)
            self.gradient.accumulate(acc, -1.0)
        finally:
            self._restore()
        return acc.div_(2.0 * h)

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


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b|`` relative to the larger of ``|a|`` and ``|b|`` (0 when both are zero)."""
    scale = max(float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b)))
    return float(torch.linalg.vector_norm(a - b)) / scale if scale > 0 else 0.0


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def make_hvp(
    loss: LossFn | Sequence[LossPiece], params: Sequence[torch.Tensor] | ParamSpace, method: str = "double_backward",
    *, step: float | None = None, deadline: Deadline | None = None,
) -> DoubleBackwardHVP | FiniteDifferenceHVP:
    """The product operator for a fixed ``method``; ``step`` is a calibrated finite-difference step.

    ``auto`` is not a method here: ``probes.hvp_choice.choose_method`` decides it first.
    """
    space = params if isinstance(params, ParamSpace) else ParamSpace(params)
    if method == "double_backward":
        return DoubleBackwardHVP(loss, space, deadline=deadline)
    if method == "finite_difference":
        return FiniteDifferenceHVP(loss, space, step=step, deadline=deadline)
    raise ValueError(f"method={method!r}; allowed 'double_backward' or 'finite_difference'")
