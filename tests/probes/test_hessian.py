"""The saddle probe on quadratics with known spectra, and its pure parts (verdict, records, EoS)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lossguard.probes.deadline import BudgetSpent
from lossguard.probes.hessian import (
    CurvatureResult,
    ProbeSkipped,
    Verdict,
    agreed_verdict,
    classify,
    probe_curvature,
    sharpness_report,
)
from lossguard.probes.hvp import DoubleBackwardHVP, LossPiece, ParamSpace
from lossguard.probes.lanczos import lanczos
from lossguard.telemetry.schema import encode


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems run fastest on one thread, and far faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N = 400
SPECTRA = {
    # one negative direction under a positive bulk: r = -0.1
    "isolated_saddle": (np.concatenate([np.linspace(0.0, 1.0, N - 2), [-1.0, 10.0]]), Verdict.SADDLE),
    # lambda_min at the edge of a dense negative bulk (hard for Krylov methods): r = -0.1
    "negative_bulk_edge": (np.concatenate([np.linspace(-1.0, 1.0, N - 1), [10.0]]), Verdict.SADDLE),
    # positive definite with a small bottom: must never read as a saddle
    "positive_definite": (np.concatenate([np.linspace(0.01, 1.0, N - 1), [10.0]]), Verdict.MINIMUM),
    # the most negative eigenvalue dominates in magnitude (power iteration returns it as "largest")
    "dominant_negative": (np.concatenate([np.linspace(-1.0, 1.0, N - 2), [-20.0, 5.0]]), Verdict.SADDLE),
}


def quadratic(eigs: np.ndarray, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    a = ((q * torch.as_tensor(eigs)) @ q.T).to(dtype)
    # two parameter tensors, so flattening and shapes are exercised too
    w1 = torch.randn(len(eigs) // 2, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w2 = torch.randn(len(eigs) - len(eigs) // 2, 1, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    def loss_fn() -> torch.Tensor:
        w = torch.cat([w1, w2.reshape(-1)])
        return 0.5 * w @ (a @ w) + torch.sin(w).sum() * 0.0

    return loss_fn, [w1, w2], a


@pytest.mark.parametrize("basis", ["bfloat16", "none"])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_frugal_bases_find_both_ends_of_the_quadratics(name: str, basis: str) -> None:
    eigs, _ = SPECTRA[name]
    loss_fn, params, _ = quadratic(eigs, torch.float32)
    op = DoubleBackwardHVP(loss_fn, ParamSpace(params))
    start = torch.randn(N, generator=torch.Generator().manual_seed(1))
    kw = {"basis_dtype": torch.bfloat16} if basis == "bfloat16" else {"keep_basis": False}
    run = lanczos(op, start, max_iter=30, **kw)
    lam_max, lam_min = float(eigs.max()), float(eigs.min())
    assert abs(run.ritz_values[-1] - lam_max) <= 0.01 * abs(lam_max)
    assert abs(run.ritz_values[0] - lam_min) <= 0.01 * abs(lam_max)
    if basis == "none":
        with pytest.raises(ValueError, match="want_vectors needs the basis"):
            lanczos(op, start, max_iter=3, keep_basis=False, want_vectors=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_quadratic_extremes_within_one_percent(name: str, dtype: torch.dtype) -> None:
    eigs, expected = SPECTRA[name]
    loss_fn, params, _ = quadratic(eigs, dtype)
    res = probe_curvature(loss_fn, params, seed=1)
    lam_max, lam_min = float(eigs.max()), float(eigs.min())
    assert abs(res.lambda_max - lam_max) <= 0.01 * abs(lam_max)
    assert abs(res.lambda_min - lam_min) <= 0.01 * abs(lam_max)
    assert res.n_hvp <= 40
    assert res.verdict is expected
    assert res.method == "double_backward" and res.fallback_reason is None
    assert res.steps >= 20 and res.n_params == N


def test_positive_definite_is_never_a_saddle_over_seeds() -> None:
    eigs, _ = SPECTRA["positive_definite"]
    loss_fn, params, _ = quadratic(eigs, torch.float32)
    verdicts = {probe_curvature(loss_fn, params, seed=s, max_iter=20).verdict for s in range(5)}
    assert Verdict.SADDLE not in verdicts


def test_direction_has_the_most_negative_curvature() -> None:
    eigs, _ = SPECTRA["isolated_saddle"]
    loss_fn, params, a = quadratic(eigs, torch.float64)
    res = probe_curvature(loss_fn, params, seed=3, return_direction=True)
    assert res.direction is not None
    assert [d.shape for d in res.direction] == [p.shape for p in params]
    d = torch.cat([t.reshape(-1) for t in res.direction])
    assert float(d.norm()) == pytest.approx(1.0, abs=1e-9)
    assert float(d @ (a @ d)) == pytest.approx(-1.0, abs=1e-3)


def test_same_seed_same_answer_and_recorded_seed_reproduces() -> None:
    eigs, _ = SPECTRA["negative_bulk_edge"]
    loss_fn, params, _ = quadratic(eigs, torch.float32)
    a = probe_curvature(loss_fn, params, seed=7, max_iter=10, min_steps=10)
    b = probe_curvature(loss_fn, params, seed=7, max_iter=10, min_steps=10)
    assert (a.lambda_min, a.lambda_max) == (b.lambda_min, b.lambda_max)
    c = probe_curvature(loss_fn, params, seed=None, max_iter=10, min_steps=10)
    d = probe_curvature(loss_fn, params, seed=c.seed, max_iter=10, min_steps=10)
    assert (c.lambda_min, c.lambda_max) == (d.lambda_min, d.lambda_max)


def timed(loss_fn, now: list[float], cost: float = 1.0):
    """``loss_fn`` on a fake clock: every evaluation (one micro-batch's forward) costs ``cost`` s."""

    def run() -> torch.Tensor:
        now[0] += cost
        return loss_fn()

    return run


def test_time_budget_stops_the_iteration_within_one_micro_batch_product() -> None:
    eigs, _ = SPECTRA["negative_bulk_edge"]
    loss_fn, params, _ = quadratic(eigs, torch.float32)
    now = [0.0]
    step = timed(loss_fn, now)
    # two micro-batches of half weight: a double-backward product rebuilds both graphs (2 s)
    pieces = [LossPiece(step, 0.5), LossPiece(step, 0.5)]
    res = probe_curvature(pieces, params, seed=0, max_seconds=20.0, clock=lambda: now[0])
    assert res.stop_reason == "time" and res.method == "double_backward"
    assert 2 <= res.steps < 10
    assert res.seconds <= 20.0 + 1.0  # past the budget by at most one micro-batch product
    full = probe_curvature([LossPiece(loss_fn, 0.5), LossPiece(loss_fn, 0.5)], params, seed=0)
    assert res.history == full.history[: res.steps]


def test_budget_spent_while_choosing_the_method_raises_and_restores_the_weights() -> None:
    eigs, _ = SPECTRA["isolated_saddle"]
    loss_fn, params, _ = quadratic(eigs, torch.float32)
    before = [p.detach().clone() for p in params]
    now = [0.0]
    # double backward's product costs 1 s; the deadline passes inside the first finite difference
    with pytest.raises(BudgetSpent):
        probe_curvature(timed(loss_fn, now), params, seed=0, max_seconds=1.5, clock=lambda: now[0])
    assert now[0] <= 1.5 + 1.0
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_small_space_stops_on_invariant_subspace_with_exact_values() -> None:
    a = torch.diag(torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=torch.float64))
    w = torch.ones(4, dtype=torch.float64, requires_grad=True)
    res = probe_curvature(lambda: 0.5 * w @ (a @ w), [w], seed=0, hvp="double_backward")
    assert res.stop_reason == "invariant_subspace" and res.converged
    assert res.lambda_min == pytest.approx(-2.0, abs=1e-12)
    assert res.lambda_max == pytest.approx(3.0, abs=1e-12)
    assert res.n_hvp == 4


def test_zero_hessian_is_degenerate() -> None:
    w = torch.ones(50, requires_grad=True)
    res = probe_curvature(lambda: (3.0 * w).sum(), [w], seed=0)
    assert res.verdict is Verdict.DEGENERATE
    assert math.isnan(res.ratio)


@pytest.mark.parametrize(
    ("lam_max", "lam_min", "res_min", "expected"),
    [
        (10.0, -0.6, 0.0, Verdict.SADDLE),
        (10.0, -0.5, 0.0, Verdict.INCONCLUSIVE),
        (10.0, -0.2, 0.0, Verdict.INCONCLUSIVE),
        (10.0, -0.1, 0.0, Verdict.MINIMUM),
        (10.0, 0.3, 0.0, Verdict.MINIMUM),
        (10.0, 0.3, 0.5, Verdict.INCONCLUSIVE),
        (10.0, -3.0, 5.0, Verdict.SADDLE),
        (0.0, 0.0, 0.0, Verdict.DEGENERATE),
        (-1.0, -5.0, 0.0, Verdict.DEGENERATE),
        (float("nan"), -1.0, 0.0, Verdict.DEGENERATE),
    ],
)
def test_classify_thresholds(lam_max: float, lam_min: float, res_min: float, expected: Verdict) -> None:
    verdict, ratio = classify(lam_max, lam_min, residual_min=res_min)
    assert verdict is expected
    if expected is not Verdict.DEGENERATE:
        assert ratio == pytest.approx(lam_min / lam_max)


def test_agreed_verdict_needs_every_batch() -> None:
    assert agreed_verdict([Verdict.SADDLE, Verdict.SADDLE]) is Verdict.SADDLE
    assert agreed_verdict([Verdict.SADDLE, Verdict.MINIMUM]) is Verdict.INCONCLUSIVE
    assert agreed_verdict([Verdict.MINIMUM]) is Verdict.MINIMUM
    assert agreed_verdict([]) is Verdict.INCONCLUSIVE


def test_probe_record_is_strict_json_with_the_numbers() -> None:
    eigs, _ = SPECTRA["isolated_saddle"]
    loss_fn, params, _ = quadratic(eigs, torch.float32)
    res = probe_curvature(loss_fn, params, seed=0)
    rec = json.loads(encode(res.to_record(step=12)))
    assert rec["kind"] == "probe" and rec["step"] == 12 and rec["verdict"] == "saddle"
    for key in ("lambda_max", "lambda_min", "ratio", "n_hvp", "seconds", "method", "residuals", "seed"):
        assert key in rec
    assert rec["lambda_max"] == pytest.approx(10.0, rel=0.01)
    assert len(rec["residuals"]) == 2 and "saddle" in rec["message"]
    skipped = json.loads(encode(ProbeSkipped("warmup", "step 3 is inside warmup", 3).to_record()))
    assert skipped == {"kind": "probe", "skipped": True, "reason": "warmup", "message": "step 3 is inside warmup", "step": 3}
    assert ProbeSkipped("lora_b_zero", "B is zero").to_record(step=9)["step"] == 9


def test_degenerate_record_encodes_nan_as_string() -> None:
    res = CurvatureResult(
        lambda_max=0.0, lambda_min=0.0, ratio=math.nan, verdict=Verdict.DEGENERATE, residuals=(0.0, 0.0),
        n_hvp=3, seconds=0.1, method="double_backward", steps=3, converged=True, stop_reason="invariant_subspace",
        seed=0, n_params=3, message="degenerate",
    )
    assert json.loads(encode(res.to_record()))["ratio"] == "nan"


def test_sharpness_report_against_edge_of_stability() -> None:
    sgd = sharpness_report(150.0, 0.01, "sgd")
    assert sgd["edge"] == 2.0 and sgd["edge_sharpness"] == pytest.approx(200.0)
    assert sgd["sharpness_x_lr"] == pytest.approx(1.5) and sgd["fraction_of_edge"] == pytest.approx(0.75)
    adam = sharpness_report(1900.0, 0.01, "adam")
    assert adam["edge"] == pytest.approx(38.0) and adam["fraction_of_edge"] == pytest.approx(0.5)
    assert "preconditioned" in adam["message"]
    assert sharpness_report(10.0, 0.1, "sgd", beta1=0.9)["edge"] == pytest.approx(3.8)
    with pytest.raises(ValueError, match="lr="):
        sharpness_report(1.0, 0.0)
    with pytest.raises(ValueError, match="optimizer="):
        sharpness_report(1.0, 0.1, "lion")


def test_bad_arguments_fail_loudly() -> None:
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="params is empty"):
        probe_curvature(lambda: w.sum(), [])
    with pytest.raises(ValueError, match="does not require grad"):
        probe_curvature(lambda: w.sum(), [torch.ones(3)])
    with pytest.raises(ValueError, match="hvp="):
        probe_curvature(lambda: w.sum(), [w], hvp="magic")
