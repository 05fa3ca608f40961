"""Which Hessian-vector product a probe uses, decided on one micro-batch before the probe starts.

Double backward is exact, but every op on the way must be twice differentiable: attention has to
run on PyTorch's math backend, since the fused kernels training uses (flash, memory-efficient,
CPU flash) are not, and some ops (``@once_differentiable`` functions) silently drop their second
derivative. Finite differences take two plain gradients through the model's own kernels, but
their step has to be calibrated. ``choose_method`` measures both on the first micro-batch:

1. one double-backward product (its seconds and, on CUDA, its peak memory; a second one before
   acting on a difference in cost, since the first carries one-time warm-up);
2. finite differences from coarse to fine until one agrees with it (within 5%): double backward
   is confirmed, or, when none agrees, found wrong and dropped;
3. when finite differences are clearly cheaper per product (<= 0.75x) and the products the
   time left allows save more than a full step calibration costs (about 6 more products) plus
   a tenth of the time left (at least a second), that calibration runs and, if finite
   differences are still cheaper over it and their finest step agrees with the exact product,
   they are used.

The choice, the seconds per micro-batch product of each method and the reason are recorded.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lossguard.probes.deadline import BudgetSpent, Deadline
from lossguard.probes.hvp import (
    DoubleBackwardHVP,
    FiniteDifferenceHVP,
    LossPiece,
    ParamSpace,
    first_line,
    rel_diff,
)

SWITCH_BELOW = 0.75
SWITCH_SAVES_S = 1.0
REFINE_PRODUCTS = 6  # finite-difference products a full step calibration adds (6 on a 26M Llama)
CHECK_RTOL = 0.05
KEPT = "double_backward_kept_graph"


@dataclass
class MethodChoice:
    """The product method a probe uses, why, and what deciding it measured and cost.

    ``product`` is the calibration piece's product with the vector it was decided on, by the
    chosen method (dropped, ``None``, once the probe has used it). ``seconds`` holds the measured seconds per micro-batch product by method;
    ``products`` the micro-batch products spent deciding; ``peak_bytes`` (CUDA only) an upper
    bound of the extra device memory of one micro-batch product (the larger of the two measured).
    """

    method: str
    reason: str
    product: torch.Tensor | None
    fd_step: float | None = None
    check_error: float | None = None
    fallback_reason: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    products: int = 0
    peak_bytes: int | None = None

    @property
    def product_seconds(self) -> float:
        """Seconds per micro-batch product with the chosen method."""
        return self.seconds[self.method]

    @property
    def kept_graph_seconds(self) -> float | None:
        """Seconds per product through a kept double-backward graph (one micro-batch per group)."""
        return self.seconds.get(KEPT) if self.method == "double_backward" else None

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "why": self.reason,
            "seconds_per_micro_batch": {k: round(v, 4) for k, v in self.seconds.items()},
            "calibration_products": self.products,
            "fd_step": self.fd_step,
            "peak_bytes": self.peak_bytes,
        }


class _Meter:
    """Seconds and (on CUDA) peak extra memory of the work done inside ``with``."""

    def __init__(self, device: torch.device, clock: Callable[[], float]) -> None:
        self.device = device
        self.clock = clock
        self.seconds = 0.0
        self.peak: int | None = None

    def __enter__(self) -> _Meter:
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        self._t0 = self.clock()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            # an upper bound without resetting the user's peak statistics: the peak since the
            # last reset is at least this product's
            self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._before)
        self.seconds = self.clock() - self._t0


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def free_cuda_cache(device: torch.device) -> None:
    """Give memory the probe held back to the device (after an out-of-memory, say)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def choose_method(
    piece: LossPiece,
    space: ParamSpace,
    v: torch.Tensor,
    *,
    hvp: str = "auto",
    deadline: Deadline | None = None,
    clock: Callable[[], float] = time.perf_counter,
    products_ahead: int = 0,
    avoid_double_backward: str | None = None,
) -> MethodChoice:
    """Decide the product method on ``piece`` (one micro-batch) with the unit vector ``v``.

    Args:
        hvp: ``auto``, or ``double_backward`` / ``finite_difference`` to force one (no check).
        products_ahead: micro-batch products the probe could run after this (capped by the time
            left); the saving of a cheaper method is weighed against the cost of calibrating it.
        avoid_double_backward: a reason not to try double backward at all (an estimate that its
            math-attention graph will not fit in memory); ``auto`` then goes straight to finite
            differences.

    Raises:
        BudgetSpent: the deadline passed before a product was done.
    """
    device = space.device
    if hvp == "double_backward":
        exact, t_db, t_kept, peak = _double_backward(piece, space, v, deadline, device, clock)
        return MethodChoice("double_backward", "hvp='double_backward' in the configuration", exact,
                            seconds={"double_backward": t_db, KEPT: t_kept}, products=1, peak_bytes=peak)
    fd = FiniteDifferenceHVP([piece], space, deadline=deadline)
    try:
        if hvp == "finite_difference" or avoid_double_backward:
            why = avoid_double_backward or "hvp='finite_difference' in the configuration"
            return _finite_differences(fd, v, device, clock, why, fallback=avoid_double_backward)
        fallback = None
        exact = None
        db_products = 1
        try:
            exact, t_db, t_kept, db_peak = _double_backward(piece, space, v, deadline, device, clock)
        except BudgetSpent:
            raise
        except torch.OutOfMemoryError as err:
            fallback = f"double backward ran out of memory ({first_line(err)[:80]})"
        except RuntimeError as err:
            fallback = f"double backward failed: {first_line(err)}"
        if exact is None:
            free_cuda_cache(device)
            choice = _finite_differences(fd, v, device, clock, fallback or "", fallback=fallback)
            choice.products += 1
            return choice
        with _Meter(device, clock) as m:
            approx = fd.calibrate(v, agree_with=exact, rtol=CHECK_RTOL)
        t_fd = m.seconds / max(fd.count, 1)
        peak = _max(db_peak, m.peak)
        check_error = rel_diff(exact, approx)
        seconds = {"double_backward": t_db, KEPT: t_kept, "finite_difference": t_fd}
        if check_error > CHECK_RTOL:
            fallback = (f"double backward differs from finite differences by {check_error:.1%} "
                        f"(> {CHECK_RTOL:.0%}): some op is not twice differentiable")
            return MethodChoice("finite_difference", fallback, approx, fd_step=fd.step, check_error=check_error,
                                fallback_reason=fallback, seconds=seconds, products=db_products + fd.count, peak_bytes=peak)
        # double backward at its cheapest (through a kept graph) against finite differences
        t_cmp = t_kept
        saves, floor = _saving(products_ahead, t_cmp, t_fd, deadline)
        if t_fd <= SWITCH_BELOW * t_cmp and saves >= floor:
            # the first double backward of a process carries one-time warm-up, which can exceed
            # the product itself: time a second one before acting on the difference
            _, t_again, kept_again, _ = _double_backward(piece, space, v, deadline, device, clock)
            db_products += 1
            seconds["double_backward"] = min(t_db, t_again)
            seconds[KEPT] = t_cmp = min(t_kept, kept_again)
            saves, floor = _saving(products_ahead, t_cmp, t_fd, deadline)
        if t_fd <= SWITCH_BELOW * t_cmp and saves >= floor:
            n0 = fd.count
            with _Meter(device, clock) as m2:
                fine = fd.calibrate(v, start=(float(fd.step or 0.0), approx))
            if fd.count > n0:
                seconds["finite_difference"] = t_fd = (m.seconds + m2.seconds) / fd.count
            fine_error = rel_diff(exact, fine)
            if t_fd > SWITCH_BELOW * t_cmp:
                why = (f"double backward: finite differences looked cheaper but took {t_fd:.3g} s per micro-batch "
                       f"product over their calibration, against {t_cmp:.3g} s")
            elif fine_error <= CHECK_RTOL:
                why = (f"finite differences on the model's own kernels: {t_fd:.3g} s per micro-batch product "
                       f"against {t_cmp:.3g} s by double backward (math attention, graph kept), about {saves:.0f} s "
                       f"saved over the probe; they agree with double backward within {fine_error:.1%}")
                return MethodChoice("finite_difference", why, fine, fd_step=fd.step, check_error=fine_error,
                                    seconds=seconds, products=db_products + fd.count, peak_bytes=_max(peak, m2.peak))
            else:
                why = (f"double backward: finite differences would be cheaper ({t_fd:.3g} s against {t_cmp:.3g} s "
                       f"per micro-batch product) but at their finest step differ from it by {fine_error:.1%}")
        elif t_fd <= SWITCH_BELOW * t_cmp:
            why = (f"double backward: finite differences are cheaper ({t_fd:.3g} s against {t_cmp:.3g} s per "
                   f"micro-batch product) but would save {max(saves, 0.0):.3g} s over this probe, under "
                   f"{floor:.3g} s")
        else:
            why = (f"double backward: {t_cmp:.3g} s per micro-batch product (graph kept; {t_db:.3g} s rebuilt) "
                   f"against {t_fd:.3g} s by finite differences")
        return MethodChoice("double_backward", why, exact, check_error=check_error, seconds=seconds,
                            products=db_products + fd.count, peak_bytes=peak)
    finally:
        fd.close()


def _double_backward(piece: LossPiece, space: ParamSpace, v: torch.Tensor, deadline: Deadline | None,
                     device: torch.device, clock: Callable[[], float]) -> tuple[torch.Tensor, float, float, int | None]:
    """One double-backward product on ``piece``: the product, the seconds of a product that builds
    its graph, of one through a kept graph, and (CUDA) the peak extra memory."""
    with _Meter(device, clock) as whole:
        with _Meter(device, clock) as build:
            db = DoubleBackwardHVP([piece], space, deadline=deadline, retain=True)
        try:
            with _Meter(device, clock) as second:
                hv = db(v)
        finally:
            db.close()
    return hv, build.seconds + second.seconds, second.seconds, whole.peak


def _saving(products_ahead: int, t_db: float, t_fd: float, deadline: Deadline | None) -> tuple[float, float]:
    """Seconds finite differences would save over the products the time left allows, less a full
    step calibration; and the least saving worth it (a second, and a tenth of the time left)."""
    left = math.inf if deadline is None else max(deadline.left(), 0.0)
    ahead = min(products_ahead, left / max(t_db, 1e-12))
    floor = SWITCH_SAVES_S if deadline is None else max(SWITCH_SAVES_S, 0.1 * left)
    return ahead * (t_db - t_fd) - REFINE_PRODUCTS * t_fd, floor


def _finite_differences(fd: FiniteDifferenceHVP, v: torch.Tensor, device: torch.device,
                        clock: Callable[[], float], why: str, *, fallback: str | None) -> MethodChoice:
    with _Meter(device, clock) as m:
        est = fd.calibrate(v)
    return MethodChoice("finite_difference", why, est, fd_step=fd.step, fallback_reason=fallback,
                        seconds={"finite_difference": m.seconds / max(fd.count, 1)}, products=fd.count,
                        peak_bytes=m.peak)
