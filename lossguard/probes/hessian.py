"""The Hessian saddle probe: is a plateau a saddle point (escapable) or a minimum-like basin?

A loss that stops falling early sits either near a saddle (some direction still curves down:
``lambda_min < 0`` clearly, so a restart, a warmer LR or more noise can escape it) or in a
basin (all curvature non-negative up to noise). The probe measures the largest and the most
negative curvature of the loss on the trainable parameters with Lanczos on Hessian-vector
products (about 30 products, each about the cost of two backward passes), and classifies
their ratio ``r = lambda_min / lambda_max``:

* ``r < -0.05``: ``saddle``;
* ``-0.05 <= r < -0.01``: ``inconclusive`` (re-probe on a larger batch);
* ``r >= -0.01``: ``minimum`` (minimum-like: no negative curvature above the noise);
* ``lambda_max`` about zero (or not finite): ``degenerate``.

The probe never changes ``.grad``, the optimizer, parameter values, the model's train/eval mode
or any random number generator (python, numpy, torch CPU and CUDA).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from lossguard.config import ProbeConfig
from lossguard.probes.deadline import BudgetSpent, Deadline
from lossguard.probes.hvp import METHODS, LossFn, LossPiece, ParamSpace, as_pieces, make_hvp
from lossguard.probes.hvp_choice import MethodChoice, choose_method, free_cuda_cache
from lossguard.probes.lanczos import lanczos, unit
from lossguard.probes.probe_cost import (
    REORTH_SHARE,
    BasisChoice,
    BasisPlace,
    PeakEstimate,
    ProbeMemory,
    ProbePlan,
    choose_basis,
    estimate_peaks,
    math_attention_bytes,
    plan_probe,
    probe_memory,
    solver_seconds,
)
from lossguard.records import ProbeVerdict as Verdict

logger = logging.getLogger("lossguard")

SADDLE_BELOW = -0.05
MINIMUM_FROM = -0.01
FLAT_TOL = 1e-10


def classify(
    lambda_max: float, lambda_min: float, *, residual_min: float = 0.0, flat_tol: float = FLAT_TOL
) -> tuple[Verdict, float]:
    """Verdict and ratio ``lambda_min / lambda_max`` (NaN when it has no meaning).

    ``degenerate`` when a value is not finite, when all curvature is below ``flat_tol`` in
    magnitude, or when there is no positive curvature (``lambda_max <= 1e-6 * |lambda_min|``).
    A ``minimum`` whose ``lambda_min`` is still uncertain by more than ``0.01 * lambda_max``
    (``residual_min``) becomes ``inconclusive``: unresolved negative curvature could hide there.
    A ``saddle`` needs no such care: a negative Ritz value is the curvature of an actual direction.
    """
    if not (math.isfinite(lambda_max) and math.isfinite(lambda_min)):
        return Verdict.DEGENERATE, math.nan
    scale = max(abs(lambda_max), abs(lambda_min))
    if scale <= flat_tol or lambda_max <= 1e-6 * scale:
        return Verdict.DEGENERATE, math.nan
    ratio = lambda_min / lambda_max
    if ratio < SADDLE_BELOW:
        return Verdict.SADDLE, ratio
    if ratio < MINIMUM_FROM or residual_min > -MINIMUM_FROM * lambda_max:
        return Verdict.INCONCLUSIVE, ratio
    return Verdict.MINIMUM, ratio


def _rule(verdict: Verdict, ratio: float) -> str:
    if verdict is Verdict.SADDLE:
        return f"r {ratio:.3f} < {SADDLE_BELOW}"
    if verdict is Verdict.MINIMUM:
        return f"r {ratio:.3f} >= {MINIMUM_FROM}"
    if verdict is Verdict.DEGENERATE:
        return "no positive curvature above noise"
    if ratio >= MINIMUM_FROM:
        return f"r {ratio:.3f} but lambda_min not resolved; re-probe with more iterations"
    return f"{SADDLE_BELOW} <= r {ratio:.3f} < {MINIMUM_FROM}; re-probe on a larger batch"


@dataclass
class CurvatureResult:
    """The probe's answer, with what it cost and how sure it is.

    ``residuals`` are ``(for lambda_max, for lambda_min)``: each bounds the distance from the
    estimate to a true eigenvalue. ``n_hvp`` counts every Hessian-vector product computed
    (including the one that checks double backward in ``auto`` mode). ``direction`` (on request)
    is the unit direction of most negative curvature, one tensor per parameter. ``groups`` holds
    one summary per probe batch when the model-level helper probed several.
    """

    lambda_max: float
    lambda_min: float
    ratio: float
    verdict: Verdict
    residuals: tuple[float, float]
    n_hvp: int
    seconds: float
    method: str
    steps: int
    converged: bool
    stop_reason: str
    seed: int
    n_params: int
    message: str
    fallback_reason: str | None = None
    check_error: float | None = None
    loss: float | None = None
    direction: list[torch.Tensor] | None = None
    history: list[tuple[float, float]] = field(default_factory=list, repr=False)
    groups: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The numbers alone (no tensors, no history)."""
        return {
            "lambda_max": self.lambda_max,
            "lambda_min": self.lambda_min,
            "ratio": self.ratio,
            "verdict": self.verdict.value,
            "n_hvp": self.n_hvp,
            "seconds": round(self.seconds, 4),
            "method": self.method,
            "residuals": list(self.residuals),
            "steps": self.steps,
            "converged": self.converged,
            "stop_reason": self.stop_reason,
        }

    def to_record(self, step: int | None = None) -> dict[str, Any]:
        """The telemetry ``probe`` record (``v`` and ``t`` are added by the writer)."""
        rec: dict[str, Any] = {"kind": "probe"}
        if step is not None:
            rec["step"] = step
        rec.update(self.summary())
        rec.update(
            {
                "seed": self.seed,
                "n_params": self.n_params,
                "message": self.message,
                "fallback_reason": self.fallback_reason,
                "check_error": self.check_error,
                "loss": self.loss,
            }
        )
        if self.groups:
            rec["groups"] = self.groups
        rec.update(self.extra)
        return rec


@dataclass
class ProbeSkipped:
    """The probe did not run, and why (``reason`` is a short code, ``message`` a sentence).

    ``details`` holds the numbers behind a cost skip (``too_expensive``: the plan and the
    seconds per micro-batch product; ``no_memory``: the memory estimate); they go into the record.
    """

    reason: str
    message: str
    step: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_record(self, step: int | None = None) -> dict[str, Any]:
        """The telemetry ``probe`` record with ``skipped: true`` (``step`` overrides ``self.step``)."""
        rec: dict[str, Any] = {"kind": "probe", "skipped": True, "reason": self.reason, "message": self.message}
        step = self.step if step is None else step
        if step is not None:
            rec["step"] = step
        rec.update(self.details)
        return rec


class _PreservedRng:
    """Puts python, numpy and torch (CPU and every initialised CUDA device) RNG states back."""

    def __enter__(self) -> _PreservedRng:
        self.py = random.getstate()
        self.np = np.random.get_state()
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return self

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _start(space: ParamSpace, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(space.size, generator=gen, dtype=torch.float64).to(space.device, space.dtype)


def probe_curvature(
    loss_fn: LossFn | Sequence[LossPiece],
    params: Sequence[torch.Tensor],
    *,
    max_iter: int = 30,
    seed: int | None = None,
    tol: float = 1e-3,
    max_seconds: float | None = None,
    return_direction: bool = False,
    hvp: str = "auto",
    min_steps: int = 20,
    clock: Callable[[], float] = time.perf_counter,
) -> CurvatureResult:
    """Largest and most negative curvature of the loss w.r.t. ``params``, and the verdict.

    Args:
        loss_fn: zero-argument callable returning the scalar loss, or the loss in micro-batch
            pieces (``LossPiece``s: ``sum(weight * fn())``), each computed and freed in turn so
            that a product holds one micro-batch's graph. Put the model in eval mode first: a
            new dropout mask per product fakes negative curvature.
        params: the tensors to differentiate (``requires_grad``), e.g. the LoRA adapters.
        max_iter: Lanczos steps, one Hessian-vector product each (20-60 is sensible).
        seed: start vector seed (a private generator; ``None`` draws one from the OS and records it).
        tol: early stop after ``min_steps`` once both extreme residuals are ``<= tol * max|theta|``.
        max_seconds: the time budget, choosing the product method included: the clock is read
            before every micro-batch, so the probe ends at most one micro-batch product past it.
        return_direction: also return the unit direction of most negative curvature.
        hvp: ``auto`` (see ``probes.hvp_choice.choose_method``), ``double_backward`` or
            ``finite_difference``.

    Raises:
        ValueError: no parameters, a parameter without ``requires_grad``, or a bad ``hvp``/``max_iter``.
        BudgetSpent: the budget ran out before a single Lanczos product was done.
    """
    params = list(params)
    if not params:
        raise ValueError("params is empty; the probe needs at least one trainable tensor")
    bad = [i for i, p in enumerate(params) if not (p.requires_grad and p.is_floating_point())]
    if bad:
        raise ValueError(f"params[{bad[0]}] does not require grad; pass trainable floating-point tensors")
    if hvp not in METHODS:
        raise ValueError(f"hvp={hvp!r}; allowed {', '.join(METHODS)}")
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r} must be >= 1")
    pieces = as_pieces(loss_fn)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    deadline = Deadline(max_seconds, clock)
    with _PreservedRng(), torch.enable_grad():
        space = ParamSpace(params)
        start = _start(space, seed)
        choice = choose_method(pieces[0], space, unit(start), hvp=hvp, deadline=deadline, clock=clock,
                               products_ahead=max_iter * len(pieces))
        first = choice.product if len(pieces) == 1 else None
        choice.product = None
        return _solve(pieces, space, choice, start, seed=seed, max_iter=max_iter, tol=tol, min_steps=min_steps,
                      deadline=deadline, return_direction=return_direction, first_product=first,
                      calibration_products=choice.products)


def _solve(
    pieces: list[LossPiece], space: ParamSpace, choice: MethodChoice, start: torch.Tensor, *, seed: int,
    max_iter: int, tol: float, min_steps: int, deadline: Deadline, return_direction: bool,
    first_product: torch.Tensor | None, calibration_products: int, memory: ProbeMemory | None = None,
) -> CurvatureResult:
    """Lanczos with the chosen product method on ``pieces``; the result, timed from ``deadline.start``."""
    op = make_hvp(pieces, space, choice.method, step=choice.fd_step, deadline=deadline)
    place = memory.basis_place if memory is not None else BasisPlace.DEVICE
    try:
        run = lanczos(
            op, start, max_iter=max_iter, tol=tol, min_steps=min_steps, clock=deadline.clock,
            want_vectors=return_direction, deadline=deadline, first_product=first_product,
            basis_device="cpu" if place is BasisPlace.HOST else None,
            basis_dtype=torch.bfloat16 if memory is not None and memory.basis_half else None,
            keep_basis=place is not BasisPlace.NONE,
        )
        loss_value = getattr(op, "loss_value", None)
        n_hvp = calibration_products + op.count
    finally:
        op.close()
    if run.steps == 0:
        raise BudgetSpent("the time budget ran out before the first Lanczos product")
    seconds = deadline.spent()
    theta = run.ritz_values
    lam_min, lam_max = float(theta[0]), float(theta[-1])
    res_max, res_min = float(run.residuals[-1]), float(run.residuals[0])
    scale = float(np.max(np.abs(theta)))
    tol_met = max(res_max, res_min) <= tol * scale
    converged = run.stop_reason in ("converged", "invariant_subspace") or tol_met
    verdict, ratio = classify(lam_max, lam_min, residual_min=res_min)
    message = (
        f"{verdict.value}: lambda_min {lam_min:.4g}, lambda_max {lam_max:.4g} ({_rule(verdict, ratio)}) "
        f"from {n_hvp} Hessian-vector products ({choice.method}) in {seconds:.2f} s"
    )
    direction = None
    if return_direction and run.min_vector is not None:
        direction = [t.detach().clone() for t in space.unflatten(run.min_vector)]
    return CurvatureResult(
        lambda_max=lam_max, lambda_min=lam_min, ratio=ratio, verdict=verdict, residuals=(res_max, res_min),
        n_hvp=n_hvp, seconds=seconds, method=choice.method, steps=run.steps, converged=bool(converged),
        stop_reason=run.stop_reason, seed=seed, n_params=space.size, message=message,
        fallback_reason=choice.fallback_reason, check_error=choice.check_error, loss=loss_value,
        direction=direction, history=run.history, extra={"hvp": choice.summary()},
    )


Batch = Mapping[str, Any]


def _split_rows(batch: Batch, k: int) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{} for _ in range(k)]
    for key, value in batch.items():
        chunks = torch.tensor_split(value, k) if isinstance(value, torch.Tensor) and value.dim() > 0 else [value] * k
        for part, chunk in zip(parts, chunks, strict=True):
            part[key] = chunk
    return parts


def split_groups(batches: Sequence[Batch] | Sequence[Sequence[Batch]], groups: int) -> list[list[Batch]]:
    """Disjoint probe groups from the kept batches.

    Nested lists are taken as the groups themselves. A flat list is cut into ``groups``
    contiguous runs of batches; with fewer batches than groups, every batch's rows are split
    instead (so one kept batch of 128 sequences gives two groups of 64).
    """
    if not batches:
        return []
    if not isinstance(batches[0], Mapping):
        return [list(g) for g in batches if len(g) > 0]  # type: ignore[arg-type]
    flat = list(batches)  # type: ignore[arg-type]
    if groups <= 1:
        return [flat]
    if len(flat) >= groups:
        cuts = np.array_split(np.arange(len(flat)), groups)
        return [[flat[i] for i in idx] for idx in cuts]
    rows = min(_rows(b) for b in flat)
    if rows < groups:
        return [flat]
    split = [_split_rows(b, groups) for b in flat]
    return [[parts[g] for parts in split] for g in range(groups)]


def _rows(batch: Batch) -> int:
    labels = batch.get("labels")
    return int(labels.shape[0]) if isinstance(labels, torch.Tensor) and labels.dim() > 0 else 1


def _count_targets(batch: Batch) -> int:
    labels = batch["labels"]
    return int((labels[..., 1:] != -100).sum())


@dataclass
class _MicroBatch:
    """One kept training micro-batch: its loss (the model's kernels, and math attention), its size."""

    fn: LossFn
    twice: LossFn
    tokens: int
    rows: int
    seq_len: int


def _own_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    return model(**batch).loss


def _math_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math SDPA backend is twice differentiable; the fused kernels (flash, efficient, CPU
    # flash) are not
    with sdpa_kernel([SDPBackend.MATH]):
        return model(**batch).loss


def _micro_batches(model: Any, group: list[Batch], device: torch.device) -> list[_MicroBatch]:
    out = []
    for batch in group:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        tokens = _count_targets(moved)
        if tokens > 0:
            labels = moved["labels"]
            seq = int(labels.shape[-1]) if labels.dim() > 0 else 1
            out.append(_MicroBatch(functools.partial(_own_loss, model, moved), functools.partial(_math_loss, model, moved),
                                   tokens, _rows(moved), seq))
    return out


def _pieces(chosen: list[_MicroBatch]) -> list[LossPiece]:
    # token-weighted, so the probe sees the mean loss over the chosen sequences' label tokens
    total = sum(mb.tokens for mb in chosen)
    return [LossPiece(mb.fn, mb.tokens / total, mb.twice) for mb in chosen]


MemoryReader = Callable[[torch.device], tuple[int | None, int | None]]


def free_memory(device: torch.device) -> tuple[int | None, int | None]:
    """Free bytes on ``device`` (CUDA: the driver's free plus the allocator's cached blocks) and on
    the host (``MemAvailable``); ``None`` where unknown."""
    host: int | None = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        host = None
    dev: int | None = None
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            dev = int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        except RuntimeError:
            dev = None
    return dev, host


def _attention_risk(model: Any, mbs: list[_MicroBatch], free: int | None, fraction: float) -> str | None:
    """Why double backward should not be tried (its math-attention graph would not fit), or None."""
    cfg = getattr(model, "config", None)
    layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
    if free is None or not isinstance(layers, int) or not isinstance(heads, int) or not mbs:
        return None
    dtype = getattr(model, "dtype", torch.float32)
    value = torch.finfo(dtype).bits // 8 if isinstance(dtype, torch.dtype) and dtype.is_floating_point else 4
    big = max(mbs, key=lambda mb: mb.rows * mb.seq_len * mb.seq_len)
    need = math_attention_bytes(layers=layers, heads=heads, rows=big.rows, seq_len=big.seq_len, value_bytes=value)
    if need <= fraction * free:
        return None
    return (f"double backward would need about {need / 2**30:.1f} GiB for math attention on one micro-batch "
            f"({layers} layers x {big.rows} x {heads} heads x {big.seq_len}^2) and {fraction:.0%} of the free "
            f"memory is {fraction * free / 2**30:.1f} GiB: finite differences on the model's own kernels")


def _first_product(pieces: list[LossPiece], space: ParamSpace, choice: MethodChoice, start: torch.Tensor,
                   deadline: Deadline) -> torch.Tensor:
    """The first Lanczos product of the first group: the method was chosen on its first micro-batch
    with the same vector, so that micro-batch's share is already known."""
    assert choice.product is not None
    known = choice.product * pieces[0].weight
    if len(pieces) == 1:
        return known
    rest = make_hvp(pieces[1:], space, choice.method, step=choice.fd_step, deadline=deadline)
    try:
        return known + rest(unit(start))
    finally:
        rest.close()


def _plan_and_basis(choice: MethodChoice, n_params: int, n_mb: int, groups: int, cfg: ProbeConfig, min_iter: int,
                    budget: float, pass_s: float, device: torch.device, need_vectors: bool,
                    peaks: PeakEstimate | None, read_memory: MemoryReader) -> tuple[ProbePlan, BasisChoice]:
    """The time plan and the basis placement, decided together: a kept basis gives way to the
    three-term recurrence when its reorthogonalization would take more than ``REORTH_SHARE`` of
    the probe, when it would take the peak past ``max_memory_ratio`` x training's, when it does
    not fit in free memory, or when only the cheaper recurrence fits the time."""

    def plan_for(keep: bool) -> ProbePlan:
        return plan_probe(budget_s=budget, product_s=choice.product_seconds, micro_batches=n_mb, groups=groups,
                          max_iter=cfg.max_iter, min_iter=min_iter, pass_s=pass_s,
                          single_s=choice.kept_graph_seconds, keep_basis=keep)

    plan = plan_for(True)
    reorth = solver_seconds(plan.products, pass_s)
    heavy = peaks is not None and not peaks.basis_fits(probe_memory(n_params, vectors=plan.products).basis_bytes,
                                                         choice.method)
    prefer = None
    if not need_vectors:
        if not plan.fits:
            prefer = "only the recurrence's lighter solver fits the time"
        elif heavy:
            prefer = f"a kept basis would take the peak memory past {cfg.max_memory_ratio:g} x training's"
        elif reorth > REORTH_SHARE * plan.seconds / groups:
            prefer = (f"reorthogonalizing {plan.products} vectors would take about {reorth:.3g} s, more than "
                      f"{REORTH_SHARE:.0%} of the probe")
    if prefer:
        plan = plan_for(False)
    dev_free, host_free = read_memory(device)
    basis = choose_basis(n_params, vectors=plan.products, device_free=dev_free, host_free=host_free,
                         accelerator=device.type != "cpu", graph_bytes=choice.peak_bytes,
                         fraction=cfg.max_memory_fraction, need_vectors=need_vectors, prefer_recurrence=prefer)
    if basis.fits and not basis.keep and not prefer:
        plan = plan_for(False)
    return plan, basis


def _estimate_peaks(device: torch.device, n_params: int, ratio: float) -> PeakEstimate | None:
    """On CUDA, training's allocated memory now and its peak so far (read, never reset), and
    where each product method would take the peak. Elsewhere ``None``: a process's peak RSS
    includes whatever loaded the model, and a CPU rarely runs out first."""
    if device.type != "cuda":
        return None
    try:
        now, peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    except RuntimeError:
        return None
    return estimate_peaks(now=now, peak=peak, n_params=n_params, ratio=ratio)


def _pass_seconds(v: torch.Tensor, clock: Callable[[], float]) -> float:
    """One pass over a trainable-sized vector (a dot product), the unit of the solver's own work."""
    best = math.inf
    for _ in range(3):
        t = clock()
        float(torch.dot(v, v))
        best = min(best, clock() - t)
    return best


SHARDED = ("probe skipped: parameters are sharded (FSDP2/DTensor); a Hessian-vector product needs every rank's "
           "shard, and lossguard has no distributed one yet")


def sharded_reason(model: Any) -> str | None:
    """Why the probe cannot run on ``model``: its parameters are sharded over ranks (FSDP2's
    DTensors), so a Hessian-vector product on this rank's parameters is not the model's; None
    when they are whole."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return SHARDED
    return None


def probe_model(
    model: Any,
    batches: Sequence[Batch] | Sequence[Sequence[Batch]],
    *,
    config: ProbeConfig | None = None,
    seed: int = 0,
    step: int | None = None,
    warmup_steps: int = 0,
    return_direction: bool = False,
    clock: Callable[[], float] = time.perf_counter,
    product_seconds: float | None = None,
    read_memory: MemoryReader = free_memory,
) -> CurvatureResult | ProbeSkipped:
    """Probe a Hugging Face causal LM on kept training micro-batches; never raises into training.

    The loss is the model's own (``model(**batch).loss``, batches with ``labels``), averaged over
    target tokens, on the trainable parameters only, with every module in eval mode for the
    probe and each module's previous mode restored after. Every Hessian-vector product is summed
    micro-batch by micro-batch (each kept batch is one training micro-batch), token-weighted, each
    graph freed before the next: a product needs one micro-batch's double backward in memory.

    The budget, ``config.max_seconds``, covers everything: before spending anything, when
    ``product_seconds`` (one micro-batch product, measured by an earlier probe or estimated from
    the training step) says that even the smallest probe (``groups`` x ``min_iter`` products on
    one micro-batch) cannot fit, the probe is skipped as ``too_expensive``. Otherwise the product
    method is chosen and timed on the first micro-batch (``probes.hvp_choice``), and
    ``probes.probe_cost.plan_probe`` sizes the probe, micro-batches and products, to the time
    left; the Lanczos basis is placed by ``choose_basis`` within ``max_memory_fraction`` of the
    free memory that ``read_memory(device)`` reports (device and host bytes, ``free_memory``: the
    hardware's own reading), ``no_memory`` when nowhere. The clock is read before every micro-batch, so a
    probe ends at most one micro-batch product past its budget.

    Two-batch rule: the batches are split into ``config.groups`` disjoint groups (see
    ``split_groups``; pass a list of lists to choose them), each probed with its own seed and an
    equal share of the time left, and the verdict stands only when all groups agree; otherwise
    (or when a group got no time) it is ``inconclusive``. The returned numbers are the first
    group's; ``groups`` holds every group's summary, and ``n_hvp``/``seconds`` are totals.

    Skipped (``ProbeSkipped``, reason recorded) when disabled, during warmup
    (``step < warmup_steps``), without trainable parameters or target tokens, while any LoRA B
    matrix is all zeros (the adapter's Hessian is indefinite by construction at PEFT's init),
    when it cannot fit in time (``too_expensive``, ``time``) or memory (``no_memory``), or when
    the probe itself fails (``out_of_memory``, after freeing what it held; ``error``), which is
    logged as a warning.
    """
    cfg = config or ProbeConfig()
    if not cfg.enabled:
        return ProbeSkipped("disabled", "the Hessian probe is disabled in the configuration", step)
    if step is not None and step < warmup_steps:
        return ProbeSkipped("warmup", f"step {step} is inside warmup ({warmup_steps} steps); probe skipped", step)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return ProbeSkipped("no_trainable_parameters", "the model has no trainable parameters to probe", step)
    sharded = sharded_reason(model)
    if sharded is not None:
        return ProbeSkipped("sharded", sharded, step)
    zero_b = [n for n, p in named if "lora_B" in n and not bool(torch.any(p.detach() != 0))]
    if zero_b:
        return ProbeSkipped(
            "lora_b_zero",
            f"{len(zero_b)} LoRA B matrices are all zeros (first: {zero_b[0]}); the adapter's Hessian is "
            "indefinite by construction until B moves, so the probe waits",
            step,
        )
    group_list = split_groups(batches, cfg.groups)
    if not group_list:
        return ProbeSkipped("no_batches", "no batches were kept for the probe", step)
    if any("labels" not in b for g in group_list for b in g):
        return ProbeSkipped("no_labels", "a probe batch has no 'labels'; the probe needs the training loss", step)
    params = [p for _, p in named]
    device = params[0].device
    groups = [_micro_batches(model, g, device) for g in group_list]
    if not all(groups):
        return ProbeSkipped("no_labels", "the probe batches have no target tokens (all labels are -100)", step)
    return _probe_groups(model, params, groups, cfg, seed=seed, step=step, return_direction=return_direction,
                         clock=clock, product_seconds=product_seconds, read_memory=read_memory)


def _probe_groups(
    model: Any, params: list[torch.Tensor], groups: list[list[_MicroBatch]], cfg: ProbeConfig, *, seed: int,
    step: int | None, return_direction: bool, clock: Callable[[], float], product_seconds: float | None,
    read_memory: MemoryReader,
) -> CurvatureResult | ProbeSkipped:
    device = params[0].device
    accelerator = device.type != "cpu"
    n_params = sum(p.numel() for p in params)
    n_mb = min(len(g) for g in groups)
    min_iter = min(cfg.min_iter, cfg.max_iter)
    spent = {"product_seconds": product_seconds}
    if product_seconds is not None and product_seconds > 0:
        deciding = (2 if cfg.hvp == "auto" else 1) * product_seconds
        pre = plan_probe(budget_s=cfg.max_seconds - deciding, product_s=product_seconds, micro_batches=n_mb,
                         groups=len(groups), max_iter=cfg.max_iter, min_iter=min_iter)
        if not pre.fits:
            return ProbeSkipped("too_expensive", f"{pre.message} (estimated before probing, {deciding:.3g} s "
                                f"more to choose the product method)", step, {**spent, "plan": pre.summary()})
    dev_free, host_free = read_memory(device)
    room = choose_basis(n_params, vectors=min_iter, device_free=dev_free, host_free=host_free,
                        accelerator=accelerator, fraction=cfg.max_memory_fraction, need_vectors=return_direction)
    if not room.fits:
        return ProbeSkipped("no_memory", room.message, step, {"memory": room.memory.summary()})
    avoid = _attention_risk(model, groups[0], dev_free if accelerator else host_free, cfg.max_memory_fraction)
    if avoid and cfg.hvp == "double_backward":
        return ProbeSkipped("no_memory", avoid, step)
    peaks = _estimate_peaks(device, n_params, cfg.max_memory_ratio)
    if avoid is None and peaks is not None and peaks.avoid_double_backward:
        avoid = f"finite differences, to hold the memory: {peaks.message}"
    modes = {m: m.training for m in model.modules()}
    deadline = Deadline(cfg.max_seconds, clock)
    results: list[CurvatureResult] = []
    sizes: list[tuple[int, int]] = []
    failure: ProbeSkipped | None = None
    plan = choice = basis = None
    try:
        model.eval()
        with _PreservedRng(), torch.enable_grad():
            space = ParamSpace(params)
            first = groups[0][0]
            start = _start(space, seed)
            choice = choose_method(LossPiece(first.fn, 1.0, first.twice), space, unit(start), hvp=cfg.hvp,
                                   deadline=deadline, clock=clock, avoid_double_backward=avoid,
                                   products_ahead=len(groups) * cfg.max_iter * n_mb)
            spent["product_seconds"] = choice.product_seconds
            plan, basis = _plan_and_basis(choice, n_params, n_mb, len(groups), cfg, min_iter, deadline.left(),
                                          _pass_seconds(choice.product, clock), device, return_direction, peaks,
                                          read_memory)
            if not plan.fits:
                return ProbeSkipped("too_expensive", plan.message, step,
                                    {**spent, "plan": plan.summary(), "hvp": choice.summary()})
            if not basis.fits:
                return ProbeSkipped("no_memory", basis.message, step, {"memory": basis.memory.summary()})
            for i, group in enumerate(groups):
                chosen = group[: plan.micro_batches]
                pieces = _pieces(chosen)
                share = deadline.sooner(deadline.left() / (len(groups) - i))
                try:
                    first = None
                    if i == 0:
                        first = _first_product(pieces, space, choice, start, share)
                        choice.product = None  # held only until used
                    results.append(_solve(
                        pieces, space, choice, start if i == 0 else _start(space, seed + i),
                        seed=seed + i, max_iter=plan.products, tol=cfg.tol, min_steps=20, deadline=share,
                        return_direction=return_direction and i == 0, first_product=first,
                        calibration_products=choice.products if i == 0 else 0, memory=basis.memory,
                    ))
                except BudgetSpent:
                    if not results:
                        raise
                    break
                sizes.append((sum(mb.rows for mb in chosen), sum(mb.tokens for mb in chosen)))
    except BudgetSpent:
        failure = ProbeSkipped("time", f"the probe's budget ({cfg.max_seconds:.3g} s) ran out before the first "
                               f"Lanczos product ({deadline.spent():.3g} s spent)", step, dict(spent))
    except torch.OutOfMemoryError as err:
        failure = ProbeSkipped("out_of_memory", f"the probe ran out of memory ({str(err)[:160]}); it freed what it "
                               "held and training continues", step, dict(spent))
    except Exception as err:  # noqa: BLE001 - the probe must never take training down
        logger.warning("lossguard: Hessian probe failed (%s: %s); training continues", type(err).__name__, err)
        failure = ProbeSkipped("error", f"the probe failed: {type(err).__name__}: {str(err)[:200]}", step)
    finally:
        for module, was_training in modes.items():
            module.training = was_training
    if failure is not None:
        if failure.reason == "out_of_memory":
            logger.warning("lossguard: %s", failure.message)
            free_cuda_cache(device)
        return failure
    assert plan is not None and choice is not None and basis is not None
    result = _combine(results, sizes, deadline.spent(), expected=len(groups))
    memory = {**basis.memory.summary(), "why": basis.message}
    if peaks is not None:
        memory["peak_estimate"] = peaks.summary()
    result.extra.update({"product_seconds": choice.product_seconds, "plan": plan.summary(), "memory": memory,
                         "budget_seconds": cfg.max_seconds})
    return result


def agreed_verdict(verdicts: Sequence[Verdict]) -> Verdict:
    """The verdict all probe batches share, else ``inconclusive`` (the two-batch rule)."""
    if not verdicts:
        return Verdict.INCONCLUSIVE
    first = verdicts[0]
    return first if all(v is first for v in verdicts) else Verdict.INCONCLUSIVE


def _combine(results: list[CurvatureResult], sizes: list[tuple[int, int]], seconds: float, *,
             expected: int | None = None) -> CurvatureResult:
    first = results[0]
    verdicts = [r.verdict for r in results]
    groups = [{**r.summary(), "sequences": rows, "tokens": tok} for r, (rows, tok) in zip(results, sizes, strict=True)]
    n_hvp = sum(r.n_hvp for r in results)
    extra = {**first.extra, "batch_sequences": [rows for rows, _ in sizes], "tokens": [tok for _, tok in sizes]}
    missing = (expected or len(results)) - len(results)
    verdict = agreed_verdict(verdicts) if not missing else Verdict.INCONCLUSIVE
    if missing:
        message = (
            f"inconclusive: the time ran out after {len(results)} of {expected} probe batches ("
            + ", ".join(f"{r.verdict.value} at r {r.ratio:.3f}" for r in results)
            + f"); {n_hvp} Hessian-vector products in {seconds:.2f} s"
        )
    elif len(set(verdicts)) == 1:
        message = first.message if len(results) == 1 else (
            f"{verdict.value} on all {len(results)} probe batches: "
            + "; ".join(f"r {r.ratio:.3f} (lambda_min {r.lambda_min:.4g}, lambda_max {r.lambda_max:.4g})" for r in results)
            + f"; {n_hvp} Hessian-vector products in {seconds:.2f} s"
        )
    else:
        message = (
            "inconclusive: the probe batches disagree ("
            + ", ".join(f"{r.verdict.value} at r {r.ratio:.3f}" for r in results)
            + f"); {n_hvp} Hessian-vector products in {seconds:.2f} s"
        )
    return replace(first, verdict=verdict, n_hvp=n_hvp, seconds=seconds, message=message, groups=groups, extra=extra)


def sharpness_report(lambda_max: float, lr: float, optimizer: str = "adam", *, beta1: float | None = None) -> dict[str, Any]:
    """Sharpness x learning rate against the edge of stability.

    Gradient descent is stable along a direction of curvature ``lambda`` only while
    ``lambda * lr < 2`` (``2 + 2 * momentum`` with heavy-ball momentum); training tends to sit
    right at that edge. For Adam the edge is ``(2 + 2 * beta1) / (1 - beta1)`` = 38 at
    beta1 = 0.9, but on the *preconditioned* sharpness; the probe measures the raw Hessian, so
    for Adam the comparison is indicative only. ``fraction_of_edge`` near or above 1 means the
    learning rate is at the stability limit for this curvature.

    Raises:
        ValueError: ``lr`` not positive and finite, or an unknown ``optimizer``.
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a positive finite number")
    if optimizer == "sgd":
        b = 0.0 if beta1 is None else beta1
        edge = 2.0 + 2.0 * b
    elif optimizer == "adam":
        b = 0.9 if beta1 is None else beta1
        if not 0.0 <= b < 1.0:
            raise ValueError(f"beta1={b!r} must be in [0, 1)")
        edge = (2.0 + 2.0 * b) / (1.0 - b)
    else:
        raise ValueError(f"optimizer={optimizer!r}; allowed 'adam' or 'sgd'")
    product = lambda_max * lr
    fraction = product / edge
    note = " (raw Hessian; Adam's edge is on the preconditioned sharpness)" if optimizer == "adam" else ""
    return {
        "sharpness": lambda_max,
        "lr": lr,
        "optimizer": optimizer,
        "beta1": b,
        "sharpness_x_lr": product,
        "edge": edge,
        "edge_sharpness": edge / lr,
        "fraction_of_edge": fraction,
        "message": (
            f"sharpness {lambda_max:.4g} x lr {lr:.3g} = {product:.3g}, {fraction:.1%} of the "
            f"{optimizer} edge of stability {edge:.3g} (lambda_max {edge / lr:.4g}){note}"
        ),
    }
