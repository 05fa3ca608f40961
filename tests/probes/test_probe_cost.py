"""The probe's cost model: the time plan and where the Lanczos basis goes (pure functions)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lossguard.probes.probe_cost import (
    BasisPlace,
    choose_basis,
    estimate_peaks,
    math_attention_bytes,
    plan_probe,
    probe_memory,
    solver_seconds,
)

GIB = 2**30


def test_plan_fills_the_budget_products_first_then_sequences_then_products() -> None:
    # 2 groups, 1 s per micro-batch product, 16 micro-batches kept per group
    kw = dict(product_s=1.0, micro_batches=16, groups=2, max_iter=30, min_iter=10)
    too_small = plan_probe(budget_s=19.0, **kw)
    assert not too_small.fits
    assert "2 groups x 10 products x 1 micro-batch" in too_small.message and "needs 20 s" in too_small.message
    short = plan_probe(budget_s=30.0, **kw)  # 15 s per group: fewer products than Lanczos likes, one micro-batch
    assert (short.fits, short.micro_batches, short.products) == (True, 1, 15)
    settled = plan_probe(budget_s=130.0, **kw)  # 65 s per group: 20 products on 3 micro-batches
    assert (settled.micro_batches, settled.products) == (3, 21)
    assert settled.seconds == pytest.approx(2 * 3 * 21) and settled.seconds <= 130.0
    everything = plan_probe(budget_s=1e4, **kw)
    assert (everything.micro_batches, everything.products) == (16, 30)
    assert everything.seconds == pytest.approx(2 * 16 * 30)


def test_plan_prices_the_solver_of_a_large_basis() -> None:
    kw = dict(product_s=1.0, micro_batches=16, groups=1, max_iter=30, min_iter=10)
    # 20 ms a pass (26M parameters): 20 steps of reorthogonalization cost 2*20*21*0.02 = 16.8 s
    assert solver_seconds(20, 0.02) == pytest.approx(16.8)
    free = plan_probe(budget_s=60.0, **kw)
    priced = plan_probe(budget_s=60.0, pass_s=0.02, **kw)
    assert (free.micro_batches, free.products) == (3, 20)
    assert (priced.micro_batches, priced.products) == (2, 20)  # 21 would need 42 + 18.5 s
    assert priced.seconds == pytest.approx(2 * 20 + 16.8)


@pytest.mark.parametrize("budget", [20.0, 33.3, 57.0, 400.0, 961.0, 5000.0])
def test_plan_never_exceeds_its_budget(budget: float) -> None:
    plan = plan_probe(budget_s=budget, product_s=1.0, micro_batches=16, groups=2, max_iter=30, min_iter=10)
    assert plan.fits and plan.seconds <= budget
    assert 10 <= plan.products <= 30 and 1 <= plan.micro_batches <= 16


def test_probe_memory_of_the_issue_examples() -> None:
    # QLoRA r=64 on every linear layer of a 7B model: ~160M trainable, a 30-vector float32 basis
    qlora = probe_memory(160_000_000, vectors=30)
    assert qlora.basis_bytes == 30 * 160_000_000 * 4  # 19.2 GB, the issue's figure
    assert qlora.work_bytes == 6 * 160_000_000 * 4
    assert qlora.device_bytes == qlora.basis_bytes + qlora.work_bytes
    half_host = probe_memory(160_000_000, vectors=30, half=True, place=BasisPlace.HOST, graph_bytes=GIB)
    assert half_host.basis_bytes == qlora.basis_bytes // 2 and half_host.host_bytes == half_host.basis_bytes
    assert half_host.device_bytes == half_host.work_bytes + GIB
    assert half_host.summary()["basis_dtype"] == "bfloat16"


def test_math_attention_of_a_7b_micro_batch() -> None:
    # 4 x 2048 tokens through 32 layers of 32 heads in bf16: 8 score-sized tensors per layer
    need = math_attention_bytes(layers=32, heads=32, rows=4, seq_len=2048, value_bytes=2)
    assert need == 8 * 32 * 4 * 32 * 2048 * 2048 * 2
    assert need / GIB == pytest.approx(256.0)


def test_a_basis_on_the_device_else_the_recurrence() -> None:
    n = 160_000_000  # QLoRA r=64 on a 7B model: a 30-vector float32 basis is 17.9 GiB
    work = probe_memory(n, vectors=0).device_bytes  # 3.6 GiB of working vectors
    kw = dict(vectors=30, accelerator=True, fraction=0.5)
    roomy = choose_basis(n, device_free=80 * GIB, host_free=100 * GIB, **kw)
    assert roomy.fits and roomy.keep and roomy.memory.basis_place is BasisPlace.DEVICE
    assert not roomy.memory.basis_half and roomy.memory.vectors == 30
    tight = choose_basis(n, device_free=10 * GIB, host_free=100 * GIB, **kw)
    assert tight.fits and not tight.keep and tight.memory.basis_bytes == 0
    assert tight.memory.device_bytes == work and "three-term recurrence" in tight.message
    slow = choose_basis(n, device_free=80 * GIB, host_free=100 * GIB, prefer_recurrence="it is slow", **kw)
    assert not slow.keep and slow.message.endswith("it is slow")
    no_device = choose_basis(n, device_free=work, host_free=100 * GIB, **kw)  # only half of it may be used
    assert not no_device.fits and "working vectors" in no_device.message
    graph = choose_basis(n, device_free=40 * GIB, host_free=100 * GIB, graph_bytes=10 * GIB, **kw)
    assert not graph.keep  # 3.6 + 10 GiB leave 6.4 of the 20 GiB share, under the basis's 17.9


def test_ritz_vectors_keep_a_basis_on_the_host_or_in_half_precision() -> None:
    n = 160_000_000
    kw = dict(vectors=30, accelerator=True, fraction=0.5, need_vectors=True)
    host = choose_basis(n, device_free=10 * GIB, host_free=100 * GIB, **kw)
    assert host.fits and host.memory.basis_place is BasisPlace.HOST and not host.memory.basis_half
    half = choose_basis(n, device_free=10 * GIB, host_free=20 * GIB, **kw)
    assert half.fits and half.memory.basis_place is BasisPlace.HOST and half.memory.basis_half
    assert half.memory.host_bytes == 30 * n * 2
    nowhere = choose_basis(n, device_free=10 * GIB, host_free=8 * GIB, **kw)
    assert not nowhere.fits and "8.94 GiB in bfloat16" in nowhere.message


def test_on_a_cpu_the_host_is_the_device_and_unknown_memory_is_enough() -> None:
    n = 26_000_000  # the issue's full fine-tune: 3.1 GB of float32 basis
    cpu = choose_basis(n, vectors=30, device_free=None, host_free=8 * GIB, accelerator=False)
    assert cpu.fits and cpu.keep and cpu.memory.basis_place is BasisPlace.DEVICE
    small = choose_basis(n, vectors=30, device_free=None, host_free=4 * GIB, accelerator=False)
    assert small.fits and not small.keep and "(1.42 GiB)" in small.message
    half = choose_basis(n, vectors=30, device_free=None, host_free=5 * GIB, accelerator=False, need_vectors=True)
    assert half.fits and half.memory.basis_half and half.memory.basis_place is BasisPlace.DEVICE
    unknown = choose_basis(n, vectors=30, device_free=None, host_free=None, accelerator=False)
    assert unknown.fits and unknown.keep and not unknown.memory.basis_half and unknown.memory.vectors == 30


def test_peak_estimate_prefers_finite_differences_when_a_graph_breaks_the_ratio() -> None:
    mib = 2**20
    # the LoRA r=16 run of benchmarks/probe_scale.py: 572 MB at rest, 757 MB at a step's peak
    lora = estimate_peaks(now=572 * mib, peak=757 * mib, n_params=1_249_280, ratio=1.5)
    assert lora.limit == pytest.approx(1.5 * 757 * mib)
    assert lora.double_backward == pytest.approx((572 + 3.5 * 185) * mib + 6 * 1_249_280 * 4)
    assert lora.avoid_double_backward and lora.finite_difference < lora.limit
    assert lora.basis_fits(30 * 1_249_280 * 4, "finite_difference")
    assert not lora.basis_fits(30 * 1_249_280 * 4, "double_backward")
    roomy = estimate_peaks(now=572 * mib, peak=757 * mib, n_params=1_249_280, ratio=3.0)
    assert not roomy.avoid_double_backward
    assert "against 1.5 x training's peak" in lora.message


def test_the_recurrence_costs_a_few_passes_a_step() -> None:
    assert solver_seconds(30, 0.02, keep_basis=False) == pytest.approx(8 * 30 * 0.02)
    kw = dict(product_s=1.0, micro_batches=16, groups=1, max_iter=30, min_iter=10, pass_s=0.02)
    kept = plan_probe(budget_s=60.0, **kw)
    recurrence = plan_probe(budget_s=60.0, keep_basis=False, **kw)
    assert (recurrence.micro_batches, recurrence.products) == (2, 27)  # 54 + 4.3 s
    assert recurrence.micro_batches * recurrence.products > kept.micro_batches * kept.products


def test_the_cost_model_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; "
            "from lossguard.probes.probe_cost import probe_memory; print(probe_memory(10).basis_bytes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1200", out.stderr
