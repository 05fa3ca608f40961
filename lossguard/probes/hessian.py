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

import enum
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
from lossguard.probes.hvp import METHODS, LossFn, ParamSpace, make_hvp
from lossguard.probes.lanczos import lanczos

logger = logging.getLogger("lossguard")

SADDLE_BELOW = -0.05
MINIMUM_FROM = -0.01
FLAT_TOL = 1e-10


class Verdict(str, enum.Enum):
    """What the curvature says about the point training sits at."""

    SADDLE = "saddle"
    INCONCLUSIVE = "inconclusive"
    MINIMUM = "minimum"
    DEGENERATE = "degenerate"


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
    """The probe did not run, and why (``reason`` is a short code, ``message`` a sentence)."""

    reason: str
    message: str
    step: int | None = None

    def to_record(self, step: int | None = None) -> dict[str, Any]:
        """The telemetry ``probe`` record with ``skipped: true`` (``step`` overrides ``self.step``)."""
        rec: dict[str, Any] = {"kind": "probe", "skipped": True, "reason": self.reason, "message": self.message}
        step = self.step if step is None else step
        if step is not None:
            rec["step"] = step
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


def probe_curvature(
    loss_fn: LossFn,
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
    """Largest and most negative curvature of ``loss_fn()`` w.r.t. ``params``, and the verdict.

    Args:
        loss_fn: zero-argument callable returning the scalar loss; called once for the double
            backward graph (plus twice per finite-difference product). Put the model in eval
            mode first: a new dropout mask per product fakes negative curvature.
        params: the tensors to differentiate (``requires_grad``), e.g. the LoRA adapters.
        max_iter: Lanczos steps, one Hessian-vector product each (20-60 is sensible).
        seed: start vector seed (a private generator; ``None`` draws one from the OS and records it).
        tol: early stop after ``min_steps`` once both extreme residuals are ``<= tol * max|theta|``.
        max_seconds: stop the iteration once this much time is spent (after two products).
        return_direction: also return the unit direction of most negative curvature.
        hvp: ``auto`` (double backward, checked once against finite differences),
            ``double_backward`` or ``finite_difference``.

    Raises:
        ValueError: no parameters, a parameter without ``requires_grad``, or a bad ``hvp``/``max_iter``.
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
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    t0 = clock()
    with _PreservedRng(), torch.enable_grad():
        space = ParamSpace(params)
        gen = torch.Generator().manual_seed(seed)
        start = torch.randn(space.size, generator=gen, dtype=torch.float64).to(space.device, space.dtype)
        op = make_hvp(loss_fn, params, hvp)
        try:
            budget = None if max_seconds is None else max(0.0, max_seconds - (clock() - t0))
            run = lanczos(
                op, start, max_iter=max_iter, tol=tol, min_steps=min_steps, max_seconds=budget,
                clock=clock, want_vectors=return_direction,
            )
            loss_value = getattr(getattr(op, "db", op), "loss_value", None)
            method = op.method
            n_hvp = op.count
            fallback = getattr(op, "fallback_reason", None)
            check_error = getattr(op, "check_error", None)
        finally:
            op.close()
    seconds = clock() - t0
    theta = run.ritz_values
    lam_min, lam_max = float(theta[0]), float(theta[-1])
    res_max, res_min = float(run.residuals[-1]), float(run.residuals[0])
    scale = float(np.max(np.abs(theta)))
    converged = run.stop_reason in ("converged", "invariant_subspace") or max(res_max, res_min) <= tol * scale
    verdict, ratio = classify(lam_max, lam_min, residual_min=res_min)
    message = (
        f"{verdict.value}: lambda_min {lam_min:.4g}, lambda_max {lam_max:.4g} ({_rule(verdict, ratio)}) "
        f"from {n_hvp} Hessian-vector products ({method}) in {seconds:.2f} s"
    )
    direction = None
    if return_direction and run.min_vector is not None:
        direction = [t.detach().clone() for t in space.unflatten(run.min_vector)]
    return CurvatureResult(
        lambda_max=lam_max, lambda_min=lam_min, ratio=ratio, verdict=verdict, residuals=(res_max, res_min),
        n_hvp=n_hvp, seconds=seconds, method=method, steps=run.steps, converged=bool(converged),
        stop_reason=run.stop_reason, seed=seed, n_params=space.size, message=message,
        fallback_reason=fallback, check_error=check_error, loss=loss_value, direction=direction,
        history=run.history,
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


def _model_loss_fn(model: Any, group: list[Batch], device: torch.device) -> tuple[LossFn, int, int]:
    moved = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in group]
    counts = [_count_targets(b) for b in moved]
    total = sum(counts)

    def loss_fn() -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # token-weighted mean, so the probe sees the loss of the whole group, not a mean of means
        acc = torch.zeros((), device=device)
        # the math SDPA backend is twice differentiable; the fused kernels (flash, efficient,
        # CPU flash) are not, and would force the slower finite-difference products
        with sdpa_kernel([SDPBackend.MATH]):
            for batch, n in zip(moved, counts, strict=True):
                if n > 0:
                    acc = acc + model(**batch).loss * (n / total)
        return acc

    return loss_fn, total, sum(_rows(b) for b in moved)


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
) -> CurvatureResult | ProbeSkipped:
    """Probe a Hugging Face causal LM on kept training batches; never raises into training.

    The loss is the model's own (``model(**batch).loss``, batches with ``labels``), averaged over
    target tokens, on the trainable parameters only, with every module in eval mode for the
    probe and each module's previous mode restored after. Attention runs on PyTorch's math SDPA
    backend during the probe, so exact double-backward products work with ``sdpa`` models.

    Two-batch rule: the batches are split into ``config.groups`` disjoint groups (see
    ``split_groups``; pass a list of lists to choose them), each group is probed with its own
    seed and ``max_seconds / groups``, and the verdict stands only when all groups agree;
    otherwise it is ``inconclusive``. The returned numbers are the first group's; ``groups``
    holds every group's summary, and ``n_hvp``/``seconds`` are totals. Give each group at
    least ``config.batch_size`` sequences where the data allows (``batch_sequences`` records it).

    Skipped (``ProbeSkipped``, reason recorded) when disabled, during warmup
    (``step < warmup_steps``), without trainable parameters or target tokens, while any LoRA B
    matrix is all zeros (the adapter's Hessian is indefinite by construction at PEFT's init),
    or when the probe itself fails (out of memory, say), which is logged as a warning.
    """
    cfg = config or ProbeConfig()
    if not cfg.enabled:
        return ProbeSkipped("disabled", "the Hessian probe is disabled in the configuration", step)
    if step is not None and step < warmup_steps:
        return ProbeSkipped("warmup", f"step {step} is inside warmup ({warmup_steps} steps); probe skipped", step)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return ProbeSkipped("no_trainable_parameters", "the model has no trainable parameters to probe", step)
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
    modes = {m: m.training for m in model.modules()}
    t0 = clock()
    results: list[CurvatureResult] = []
    sizes: list[tuple[int, int]] = []
    try:
        model.eval()
        for i, group in enumerate(group_list):
            loss_fn, tokens, rows = _model_loss_fn(model, group, params[0].device)
            if tokens == 0:
                return ProbeSkipped("no_labels", "the probe batches have no target tokens (all labels are -100)", step)
            share = cfg.max_seconds / len(group_list)
            results.append(
                probe_curvature(
                    loss_fn, params, max_iter=cfg.max_iter, seed=seed + i, tol=cfg.tol, max_seconds=share,
                    return_direction=return_direction and i == 0, hvp=cfg.hvp, clock=clock,
                )
            )
            sizes.append((rows, tokens))
    except Exception as err:  # noqa: BLE001 - the probe must never take training down
        logger.warning("lossguard: Hessian probe failed (%s: %s); training continues", type(err).__name__, err)
        return ProbeSkipped("error", f"the probe failed: {type(err).__name__}: {str(err)[:200]}", step)
    finally:
        for module, was_training in modes.items():
            module.training = was_training
    return _combine(results, sizes, clock() - t0)


def agreed_verdict(verdicts: Sequence[Verdict]) -> Verdict:
    """The verdict all probe batches share, else ``inconclusive`` (the two-batch rule)."""
    if not verdicts:
        return Verdict.INCONCLUSIVE
    first = verdicts[0]
    return first if all(v is first for v in verdicts) else Verdict.INCONCLUSIVE


def _combine(results: list[CurvatureResult], sizes: list[tuple[int, int]], seconds: float) -> CurvatureResult:
    first = results[0]
    verdicts = [r.verdict for r in results]
    groups = [{**r.summary(), "sequences": rows, "tokens": tok} for r, (rows, tok) in zip(results, sizes, strict=True)]
    n_hvp = sum(r.n_hvp for r in results)
    extra = {"batch_sequences": [rows for rows, _ in sizes], "tokens": [tok for _, tok in sizes]}
    verdict = agreed_verdict(verdicts)
    if len(set(verdicts)) == 1:
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
