"""The probe at scale on a real tiny LoRA Llama: micro-batched products, the time plan, skips with
estimates, memory placement, and an out-of-memory that leaves training intact.

Time is the model's own: a forward hook advances a fake clock by one second per forward pass,
as a device would take time, so budgets and plans are checked exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from lossguard.config import ProbeConfig
from lossguard.probes.hessian import CurvatureResult, ProbeSkipped, Verdict, probe_curvature, probe_model
from lossguard.probes.hvp import DoubleBackwardHVP, FiniteDifferenceHVP, LossPiece, ParamSpace
from lossguard.probes.lanczos import lanczos
from lossguard.testing.tiny import PadCollator, add_lora, build_dataset, build_model, build_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def lora_model(tok, targets=("q_proj", "v_proj")):
    model = add_lora(build_model(tok, hidden_size=32, seed=0), r=2, targets=targets)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def micro_batches(tok, sizes: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    collate = PadCollator(tok.pad_token_id)
    data = build_dataset(tok, sum(sizes), seed=seed)
    out, at = [], 0
    for n in sizes:
        out.append(collate(data[at:at + n]))
        at += n
    return out


def targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


class FakeDeviceClock:
    """Fake device time: one second per forward pass of ``model`` and one per backward pass
    through its parameters (a first-order gradient, or the second backward of a product)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.now = 0.0
        self.forwards = 0
        model.register_forward_pre_hook(self._forward)
        first = next(p for p in model.parameters() if p.requires_grad)
        first.register_hook(self._backward)

    def _forward(self, *_: object) -> None:
        self.now += 1.0
        self.forwards += 1

    def _backward(self, grad: torch.Tensor) -> None:
        self.now += 1.0

    def __call__(self) -> float:
        return self.now


def test_micro_batched_products_equal_the_whole_group_product(tok) -> None:
    model = lora_model(tok).eval()
    kept = micro_batches(tok, [3, 5, 2])
    counts = [targets(b) for b in kept]
    total = sum(counts)
    params = [p for p in model.parameters() if p.requires_grad]
    space = ParamSpace(params)
    pieces = [LossPiece(lambda b=b: model(**b).loss, n / total) for b, n in zip(kept, counts, strict=True)]

    def whole() -> torch.Tensor:  # the old probe: one graph over the group, token-weighted
        return sum(model(**b).loss * (n / total) for b, n in zip(kept, counts, strict=True))

    model.base_model.model.set_attn_implementation("eager")
    v = torch.randn(space.size, generator=torch.Generator().manual_seed(0))
    ref = DoubleBackwardHVP(whole, space)(v)
    one_at_a_time = DoubleBackwardHVP(pieces, space)
    assert not one_at_a_time.retain
    assert torch.allclose(one_at_a_time(v), ref, rtol=1e-5, atol=1e-6)
    assert one_at_a_time.loss_value == pytest.approx(float(whole().detach()), rel=1e-6)
    assert torch.allclose(DoubleBackwardHVP(pieces, space, retain=True)(v), ref, rtol=1e-5, atol=1e-6)
    # at a step coarse enough that float32 rounding does not dominate, the sums agree closely
    step = 0.01 * float(torch.linalg.vector_norm(space.flatten([p.detach() for p in params])))
    fd_ref = FiniteDifferenceHVP(whole, space, step=step)(v)
    fd_pieces = FiniteDifferenceHVP(pieces, space, step=step)
    assert torch.allclose(fd_pieces(v), fd_ref, rtol=1e-3, atol=1e-5)
    assert fd_pieces.gradient.count == 2 * len(kept)  # two gradients per micro-batch


def test_probe_on_micro_batches_matches_the_exact_hessian_of_their_token_mean(tok) -> None:
    model = lora_model(tok, targets=("q_proj",))
    kept = micro_batches(tok, [3, 5], seed=3)
    counts = [targets(b) for b in kept]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model.eval()
    model.base_model.model.set_attn_implementation("eager")
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def loss_of(vec: torch.Tensor) -> torch.Tensor:
        p = {n: c.view(params[n].shape) for n, c in zip(names, torch.split(vec, sizes), strict=True)}
        return sum(functional_call(model, p, args=(), kwargs=b).loss * (n / sum(counts))
                   for b, n in zip(kept, counts, strict=True))

    ev = torch.linalg.eigvalsh(torch.func.hessian(loss_of)(flat).double())
    lam_min, lam_max = float(ev[0]), float(ev[-1])
    model.base_model.model.set_attn_implementation("sdpa")
    res = probe_model(model, kept, config=ProbeConfig(groups=1), seed=0)
    assert isinstance(res, CurvatureResult), res
    assert res.extra["plan"]["micro_batches"] == 2 and res.extra["batch_sequences"] == [8]
    assert res.method == "double_backward"
    assert abs(res.lambda_max - lam_max) <= 0.01 * abs(lam_max)
    assert abs(res.lambda_min - lam_min) <= 0.01 * abs(lam_max)


def test_half_precision_basis_keeps_the_accuracy(tok) -> None:
    model = lora_model(tok, targets=("q_proj",)).eval()
    model.base_model.model.set_attn_implementation("eager")
    batch = micro_batches(tok, [8], seed=3)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    op = DoubleBackwardHVP(lambda: model(**batch).loss, ParamSpace(params))
    start = torch.randn(op.space.size, generator=torch.Generator().manual_seed(1))
    full = lanczos(op, start, max_iter=30, tol=0.0, min_steps=30, want_vectors=True)
    half = lanczos(op, start, max_iter=30, tol=0.0, min_steps=30, want_vectors=True, basis_dtype=torch.bfloat16)
    scale = abs(full.ritz_values[-1])
    # measured: 0.011% of lambda_max on this model, 0.004% on the MLP and quadratics
    assert abs(half.ritz_values[0] - full.ritz_values[0]) <= 1e-3 * scale
    assert abs(half.ritz_values[-1] - full.ritz_values[-1]) <= 1e-3 * scale
    assert float(torch.dot(half.min_vector, full.min_vector).abs()) == pytest.approx(1.0, abs=1e-3)


def test_too_expensive_is_skipped_before_any_forward(tok) -> None:
    model = lora_model(tok)
    clock = FakeDeviceClock(model)
    kept = micro_batches(tok, [4] * 8)
    res = probe_model(model, kept, config=ProbeConfig(max_seconds=30.0), clock=clock, product_seconds=2.0)
    assert isinstance(res, ProbeSkipped) and res.reason == "too_expensive"
    assert clock.forwards == 0
    rec = res.to_record(step=7)
    assert rec["plan"]["products"] == 10 and rec["plan"]["micro_batches"] == 1
    assert "needs 40 s" in res.message and "estimated before probing" in res.message


def test_too_expensive_after_measuring_stays_within_the_budget(tok) -> None:
    model = lora_model(tok)
    clock = FakeDeviceClock(model)
    kept = micro_batches(tok, [4] * 8)
    res = probe_model(model, kept, config=ProbeConfig(max_seconds=12.0), clock=clock)
    assert isinstance(res, ProbeSkipped) and res.reason == "too_expensive", res
    rec = res.to_record()
    # double backward: forward, first backward, second backward (3 s); 1 s through a kept graph
    assert rec["hvp"]["method"] == "double_backward" and rec["product_seconds"] == pytest.approx(3.0)
    assert rec["hvp"]["seconds_per_micro_batch"]["double_backward_kept_graph"] == pytest.approx(1.0)
    assert "takes 1 s" in res.message and "needs 20 s" in res.message
    assert clock.now <= 12.0 + 4.0  # within the budget plus one micro-batch product (4 s by finite differences)
    assert model.training


def test_the_budget_sizes_the_probe_and_holds(tok) -> None:
    model = lora_model(tok)
    clock = FakeDeviceClock(model)
    kept = micro_batches(tok, [4] * 8)  # two groups of four micro-batches
    res = probe_model(model, kept, config=ProbeConfig(max_seconds=250.0), clock=clock, seed=0)
    assert isinstance(res, CurvatureResult), res
    plan = res.extra["plan"]
    # 3 s per double-backward product on one micro-batch, which rebuilds its graph with more than
    # one; about 243 s left after choosing it: 20 products on two micro-batches a group
    assert plan["micro_batches"] == 2 and plan["products"] >= 20
    assert res.extra["batch_sequences"] == [8, 8] and len(res.groups) == 2
    assert res.seconds <= 250.0 + 3.0 and clock.now <= 250.0 + 3.0
    assert res.verdict in tuple(Verdict)
    assert res.extra["memory"]["basis_dtype"] == "float32" and res.extra["memory"]["vectors"] == plan["products"]


def test_a_tiny_memory_share_skips_with_the_estimate(tok) -> None:
    model = lora_model(tok)
    clock = FakeDeviceClock(model)
    res = probe_model(model, micro_batches(tok, [4, 4]), config=ProbeConfig(max_memory_fraction=1e-12), clock=clock)
    assert isinstance(res, ProbeSkipped) and res.reason == "no_memory"
    assert clock.forwards == 0
    assert res.to_record()["memory"]["n_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def _reading(host_free: int):
    """The hardware's free-memory reading, replayed: a CPU run (no device figure), ``host_free`` bytes."""
    return lambda device: (None, host_free)


def test_a_basis_that_does_not_fit_gives_way_to_the_recurrence_or_bfloat16(tok) -> None:
    model = lora_model(tok).train()
    modes = [m.training for m in model.modules()]
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = micro_batches(tok, [4])
    cfg = ProbeConfig(groups=1, max_iter=20)
    work = 6 * n * 4  # the working vectors, float32
    roomy = probe_model(model, kept, config=cfg, return_direction=True)
    assert isinstance(roomy, CurvatureResult) and roomy.extra["memory"]["basis_dtype"] == "float32"
    # half of the reading (max_memory_fraction) holds the working vectors and 16 float32 vectors:
    # not the 20-vector float32 basis, but the same basis in bfloat16 (10 vectors' worth)
    tight = _reading(2 * (work + 16 * n * 4))
    plain = probe_model(model, kept, config=cfg, read_memory=tight)
    assert isinstance(plain, CurvatureResult), plain
    mem = plain.extra["memory"]
    assert mem["basis_place"] == "none" and mem["basis_bytes"] == 0 and mem["device_bytes"] == work
    assert "three-term recurrence" in mem["why"] and "does not fit" in mem["why"]
    directed = probe_model(model, kept, config=cfg, read_memory=tight, return_direction=True)
    assert isinstance(directed, CurvatureResult), directed
    mem = directed.extra["memory"]
    assert mem["basis_dtype"] == "bfloat16" and mem["basis_bytes"] == mem["vectors"] * n * 2
    assert mem["basis_bytes"] + work <= tight(None)[1] / 2
    for frugal in (plain, directed):  # the same answer as the float32 basis
        assert frugal.verdict is roomy.verdict
        assert abs(frugal.lambda_max - roomy.lambda_max) <= 0.01 * abs(roomy.lambda_max)
        assert abs(frugal.lambda_min - roomy.lambda_min) <= 0.01 * abs(roomy.lambda_max)
    assert directed.direction is not None
    assert [m.training for m in model.modules()] == modes  # each module's mode as training left it


def test_no_room_for_the_working_vectors_skips_before_any_forward(tok) -> None:
    model = lora_model(tok).train()
    clock = FakeDeviceClock(model)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res = probe_model(model, micro_batches(tok, [4, 4]), config=ProbeConfig(groups=1), clock=clock,
                      read_memory=_reading(6 * n * 4))  # half of it: half the working vectors
    assert isinstance(res, ProbeSkipped) and res.reason == "no_memory"
    assert clock.forwards == 0 and model.training
    assert "working vectors" in res.message
    rec = res.to_record(step=3)
    assert rec["reason"] == "no_memory" and rec["memory"]["work_bytes"] == 6 * n * 4


def test_an_out_of_memory_inside_the_probe_is_reported_and_leaves_training_intact(tok, monkeypatch) -> None:
    from lossguard.probes import hessian

    freed: list[torch.device] = []
    real = hessian.free_cuda_cache

    def freeing(device: torch.device) -> None:  # the real one (empty_cache on CUDA), noted
        freed.append(device)
        real(device)

    monkeypatch.setattr(hessian, "free_cuda_cache", freeing)
    model = lora_model(tok).train()
    kept = micro_batches(tok, [4, 4])
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = [0]

    def device_runs_out(*_: object) -> None:  # the device fails on the probe's fourth forward
        calls[0] += 1
        if calls[0] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = model.register_forward_pre_hook(device_runs_out)
    res = probe_model(model, kept, config=ProbeConfig(groups=1))
    handle.remove()
    assert isinstance(res, ProbeSkipped) and res.reason == "out_of_memory"
    assert "freed what it held" in res.message
    assert freed == [next(model.parameters()).device]  # the allocator's cache is emptied once
    assert model.training
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert isinstance(probe_model(model, kept, config=ProbeConfig(groups=1)), CurvatureResult)


def test_the_exact_path_is_kept_where_finite_differences_save_little(tok) -> None:
    model = lora_model(tok).eval()
    batch = micro_batches(tok, [8])[0]
    params = [p for p in model.parameters() if p.requires_grad]
    res = probe_curvature(lambda: model(**batch).loss, params, seed=0, hvp="auto", max_iter=20)
    # CPU flash attention is not twice differentiable: double backward fails, finite differences run
    assert res.method == "finite_difference" and "not implemented" in res.fallback_reason
    twice = probe_curvature([LossPiece(lambda: model(**batch).loss, 1.0, _math(model, batch))], params, seed=0,
                            max_iter=20)
    assert twice.method == "double_backward"
    assert "double backward" in twice.extra["hvp"]["why"]
    assert set(twice.extra["hvp"]["seconds_per_micro_batch"]) == {
        "double_backward", "double_backward_kept_graph", "finite_difference"}


def _math(model, batch):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def loss() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.MATH]):
            return model(**batch).loss

    return loss
