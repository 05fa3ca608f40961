"""The probe against exact Hessians (torch.func + eigvalsh): an MLP and a tiny LoRA transformer,
including the models where double backward genuinely fails and the finite-difference path runs."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.function import once_differentiable
from torch.func import functional_call, hessian
from torch.utils.checkpoint import checkpoint

from lossguard.config import ProbeConfig
from lossguard.probes.hessian import CurvatureResult, probe_curvature, probe_model
from lossguard.probes.hvp import DoubleBackwardHVP, FiniteDifferenceHVP, ParamSpace
from lossguard.probes.lanczos import lanczos
from lossguard.testing.tiny import PadCollator, add_lora, build_dataset, build_model, build_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems run fastest on one thread, and far faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exact_extremes(module: torch.nn.Module, names: list[str], loss_of_module) -> tuple[float, float]:
    params = dict(module.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def f(vec: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(vec, sizes)
        return loss_of_module({n: c.view(params[n].shape) for n, c in zip(names, chunks, strict=True)})

    ev = torch.linalg.eigvalsh(hessian(f)(flat).double())
    return float(ev[0]), float(ev[-1])


def assert_accurate(res: CurvatureResult, lam_min: float, lam_max: float) -> None:
    assert abs(res.lambda_max - lam_max) <= 0.01 * abs(lam_max), (res.lambda_max, lam_max)
    assert abs(res.lambda_min - lam_min) <= 0.01 * abs(lam_max), (res.lambda_min, lam_min)
    assert res.n_hvp <= 40


class Mlp(torch.nn.Module):
    def __init__(self, act=torch.tanh, ckpt: bool = False):
        super().__init__()
        self.inp = torch.nn.Linear(6, 12)
        self.mid = torch.nn.Linear(12, 12)
        self.out = torch.nn.Linear(12, 4)
        self.act = act
        self.ckpt = ckpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        block = lambda t: self.act(self.mid(t))  # noqa: E731
        h = checkpoint(block, h, use_reentrant=True) if self.ckpt else block(h)
        return self.out(h)


def mlp_problem(dtype: torch.dtype, **kw):
    torch.manual_seed(0)
    model = Mlp(**kw).to(dtype)
    x = torch.randn(32, 6, dtype=dtype)
    y = torch.randint(0, 4, (32,))
    names = [n for n, _ in model.named_parameters()]

    def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return model, names, (lambda: torch.nn.functional.cross_entropy(model(x), y)), loss_of


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_mlp_matches_exact_hessian(dtype: torch.dtype) -> None:
    model, names, loss_fn, loss_of = mlp_problem(dtype)
    lam_min, lam_max = exact_extremes(model, names, loss_of)
    res = probe_curvature(loss_fn, list(model.parameters()), seed=0)
    assert res.method == "double_backward" and res.check_error < 1e-2
    assert_accurate(res, lam_min, lam_max)


class OnceTanh(torch.autograd.Function):
    """tanh whose backward is not differentiable (like many fused or quantized kernels)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_once_differentiable_op_is_caught_and_finite_differences_are_exact_enough(dtype: torch.dtype) -> None:
    model, names, loss_fn, _ = mlp_problem(dtype, act=OnceTanh.apply)
    twin, _, _, twin_loss_of = mlp_problem(dtype)
    lam_min, lam_max = exact_extremes(twin, names, twin_loss_of)
    forced = probe_curvature(loss_fn, list(model.parameters()), seed=0, hvp="double_backward")
    # torch 2.13 raises nothing here: double backward silently drops the op's second-order terms
    wrong_by = max(abs(forced.lambda_max - lam_max), abs(forced.lambda_min - lam_min)) / abs(lam_max)
    assert wrong_by > 0.05
    res = probe_curvature(loss_fn, list(model.parameters()), seed=0)
    assert res.method == "finite_difference"
    assert "differs from finite differences" in res.fallback_reason
    assert_accurate(res, lam_min, lam_max)


def test_reentrant_checkpointing_falls_back_and_keeps_grad() -> None:
    model, names, loss_fn, _ = mlp_problem(torch.float32, ckpt=True)
    twin, _, _, twin_loss_of = mlp_problem(torch.float32)
    lam_min, lam_max = exact_extremes(twin, names, twin_loss_of)
    params = list(model.parameters())
    sentinels = [torch.full_like(p, 0.5) for p in params]
    for p, s in zip(params, sentinels, strict=True):
        p.grad = s
    before = [p.detach().clone() for p in params]
    res = probe_curvature(loss_fn, params, seed=0)
    assert res.method == "finite_difference" and res.fallback_reason
    assert_accurate(res, lam_min, lam_max)
    assert all(p.grad is s for p, s in zip(params, sentinels, strict=True))
    assert all(torch.equal(s, torch.full_like(s, 0.5)) for s in sentinels)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.fixture(scope="module")
def lora_problem():
    """Llama (hidden 32, 2 layers) with LoRA r=2 on q_proj: 256 trainable parameters, B nonzero."""
    tok = build_tokenizer()
    model = add_lora(build_model(tok, hidden_size=32, seed=0), r=2, targets=("q_proj",))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    batch = PadCollator(tok.pad_token_id)(build_dataset(tok, 8, seed=3))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model.eval()
    model.base_model.model.set_attn_implementation("eager")

    def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, params, args=(), kwargs=batch).loss

    lam_min, lam_max = exact_extremes(model, names, loss_of)
    model.base_model.model.set_attn_implementation("sdpa")
    return model, batch, lam_min, lam_max


def test_lora_transformer_matches_exact_hessian(lora_problem) -> None:
    model, batch, lam_min, lam_max = lora_problem
    assert lam_min < 0 < lam_max
    res = probe_model(model, [batch], config=ProbeConfig(groups=1), seed=0)
    assert isinstance(res, CurvatureResult)
    assert res.n_params == 256
    assert res.method == "double_backward"
    assert_accurate(res, lam_min, lam_max)


def test_lora_fused_attention_falls_back_to_finite_differences(lora_problem) -> None:
    model, batch, lam_min, lam_max = lora_problem
    params = [p for p in model.parameters() if p.requires_grad]
    # plain loss on the sdpa model: CPU flash attention's backward is not twice differentiable
    res = probe_curvature(lambda: model(**batch).loss, params, seed=0)
    assert res.method == "finite_difference"
    assert "not implemented" in res.fallback_reason
    assert_accurate(res, lam_min, lam_max)


def sharp_bump(dtype: torch.dtype):
    """A broad quadratic far from the origin (|w| ~ 27) with a narrow bump (width 1e-3) where it
    is probed: along the bump's axis the exact curvature is 0.5 - 1e-4 / 1e-3**2 = -99.5, on a
    scale far below the finite-difference step that |w| alone suggests (~0.03-0.13)."""
    w0 = torch.full((20,), 6.0, dtype=dtype)
    d = torch.linspace(0.5, 2.0, 20, dtype=dtype)
    w = w0.clone().requires_grad_(True)

    def loss() -> torch.Tensor:
        x = w - w0
        return 0.5 * (d * x * x).sum() + 1e-4 * torch.exp(-x[0] ** 2 / 2e-6)

    return loss, w, -99.5, 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_finite_differences_calibrate_their_step_to_sharp_curvature(dtype: torch.dtype) -> None:
    loss, w, lam_min, lam_max = sharp_bump(dtype)
    space = ParamSpace([w])
    e0 = torch.zeros(20, dtype=dtype)
    e0[0] = 1.0
    # the step that |w| alone gives straddles the bump and sees only the quadratic's +0.5
    assert FiniteDifferenceHVP(loss, space, max_shrinks=0)(e0)[0] > 0
    fd = FiniteDifferenceHVP(loss, space)
    fd(torch.randn(20, dtype=dtype, generator=torch.Generator().manual_seed(0)))  # calibrates
    # float32 resolves 6.0 to 5e-7, so a step small enough for the bump moves w[0] by a few
    # ulps only: the shift itself is rounded by up to ~10%
    rel = 0.15 if dtype == torch.float32 else 0.01
    assert fd(e0)[0] == pytest.approx(lam_min, rel=rel)
    res = probe_curvature(loss, [w], seed=0, hvp="finite_difference")
    assert res.lambda_min == pytest.approx(lam_min, rel=rel)
    assert res.lambda_max == pytest.approx(lam_max, rel=0.02)
    assert torch.equal(w.detach(), torch.full((20,), 6.0, dtype=dtype))


def test_auto_keeps_exact_products_that_a_coarse_finite_difference_contradicts() -> None:
    # the check used to compare with one product at the |w|-scaled step, which missed the bump,
    # and then threw the exact products away for it
    loss, w, lam_min, lam_max = sharp_bump(torch.float64)
    res = probe_curvature(loss, [w], seed=0)
    assert res.method == "double_backward" and res.fallback_reason is None
    assert res.check_error < 0.05
    assert res.lambda_min == pytest.approx(lam_min, rel=1e-6)
    assert res.lambda_max == pytest.approx(lam_max, rel=1e-6)


@pytest.mark.parametrize("basis", ["bfloat16", "none"])
def test_frugal_bases_match_the_exact_hessian(lora_problem, basis: str) -> None:
    """What the probe falls back to when a float32 basis does not fit: bfloat16 storage
    (reorthogonalized in float32) or no stored basis (the three-term recurrence)."""
    model, batch, lam_min, lam_max = lora_problem
    mlp, names, mlp_loss, mlp_loss_of = mlp_problem(torch.float32)
    cases = [(lambda: model(**batch).loss, [p for p in model.parameters() if p.requires_grad], lam_min, lam_max),
             (mlp_loss, list(mlp.parameters()), *exact_extremes(mlp, names, mlp_loss_of))]
    model.base_model.model.set_attn_implementation("eager")
    try:
        for loss_fn, params, lo, hi in cases:
            op = DoubleBackwardHVP(loss_fn, ParamSpace(params))
            start = torch.randn(op.space.size, generator=torch.Generator().manual_seed(0))
            kw = {"basis_dtype": torch.bfloat16} if basis == "bfloat16" else {"keep_basis": False}
            run = lanczos(op, start, max_iter=30, **kw)
            assert abs(run.ritz_values[-1] - hi) <= 0.01 * abs(hi), (basis, run.ritz_values[-1], hi)
            assert abs(run.ritz_values[0] - lo) <= 0.01 * abs(hi), (basis, run.ritz_values[0], lo)
    finally:
        model.base_model.model.set_attn_implementation("sdpa")
