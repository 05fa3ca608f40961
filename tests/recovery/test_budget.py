"""The recovery cost model and the snapshot cadence it chooses (pure), and the measurements behind it."""

import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from lossguard.config import RecoveryConfig
from lossguard.recovery.apply import Recoverer
from lossguard.recovery.budget import (
    DEFAULT_EVERY,
    CadenceReason,
    SnapshotCost,
    choose_cadence,
    cost_line,
    cost_rows,
)
from lossguard.recovery.cost import (
    measure_capture,
    measure_check,
    measure_cost,
    measure_disk,
    optimizer_bytes,
)
from lossguard.recovery.snapshot import all_finite

GB = 10**9


def _cost(n: float, *, bytes_per_value: int = 4, capture_gbs: float = 10.0, disk_gbs: float | None = 2.0,
          host: float | None = 1e12, cap_mb: float = 512.0) -> SnapshotCost:
    params = int(n * bytes_per_value)
    opt = int(n * 8)  # AdamW: two fp32 moments
    return SnapshotCost(trainable_params=int(n), param_bytes=params, optimizer_bytes=opt, optimizer_estimated=True,
                        capture_bytes_per_s=capture_gbs * GB, disk_bytes_per_s=None if disk_gbs is None else disk_gbs * GB,
                        host_available=None if host is None else int(host), memory_cap=int(cap_mb * 2**20))


def test_seven_b_full_fine_tune_costs_what_the_issue_says() -> None:
    cost = _cost(7e9, bytes_per_value=2)  # bf16 weights, fp32 moments
    assert cost.snapshot_bytes == 70 * GB
    assert cost.capture_seconds == pytest.approx(7.0)
    assert cost.spill_seconds == pytest.approx(35.0)
    # every 50 steps of 1 s, each snapshot spilling: (7 + 35) / 50 = 84% of training time
    naive = choose_cadence(cost, step_seconds=1.0, budget=1.0, rollback_steps=100, max_steps=10_000, user_every=50)
    assert naive.reason is CadenceReason.USER and naive.share == pytest.approx(42.0 / 50, rel=0.01)
    chosen = choose_cadence(cost, step_seconds=1.0, budget=0.01, rollback_steps=100, max_steps=10_000)
    # 4 snapshots in the run, 3 of them spill: (7 + 3/4 x 35) s each, every 3325 steps
    assert chosen.every == 3325 and chosen.seconds_per_snapshot == pytest.approx(7 + 0.75 * 35)
    assert chosen.share <= 0.01 < cost.seconds_per_snapshot(chosen.every - 1, 10_000) / (chosen.every - 1)
    assert chosen.reason is CadenceReason.COARSE and not chosen.use_checkpoints
    with_ckpts = choose_cadence(cost, step_seconds=1.0, budget=0.01, rollback_steps=100, max_steps=10_000,
                                save_every=200)
    assert with_ckpts.reason is CadenceReason.CHECKPOINTS and with_ckpts.use_checkpoints
    assert "checkpoints (every 200 steps)" in with_ckpts.message


def test_lora_keeps_the_default_cadence() -> None:
    cost = _cost(40e6)  # QLoRA r=16 on a 7B model: 480 MB of adapter and moments
    c = choose_cadence(cost, step_seconds=1.0, budget=0.01, rollback_steps=100, max_steps=2000)
    assert c.every == DEFAULT_EVERY and c.reason is CadenceReason.DEFAULT
    assert c.share == pytest.approx(cost.seconds_per_snapshot(DEFAULT_EVERY, 2000) / 50)
    assert c.share < 0.01


def test_spills_only_count_past_what_memory_holds() -> None:
    cost = _cost(10e6, cap_mb=512)  # 120 MB a snapshot: 4 fit in memory
    assert cost.in_memory() == 4
    # 200 steps every 50: 5 snapshots, one spills -> 1/5 of a spill per snapshot
    per = cost.seconds_per_snapshot(50, 200)
    assert per == pytest.approx(cost.capture_seconds + cost.spill_seconds / 5)
    assert cost.seconds_per_snapshot(50, 150) == pytest.approx(cost.capture_seconds)


def test_a_coarser_cadence_within_rollback_steps_is_budget() -> None:
    cost = _cost(1e9, capture_gbs=10.0, disk_gbs=None)  # 12 GB copied in 1.2 s, no spill folder
    c = choose_cadence(cost, step_seconds=2.0, budget=0.01, rollback_steps=100, max_steps=5000)
    assert c.every == math.ceil(1.2 / 0.02) == 60 and c.reason is CadenceReason.BUDGET


def test_measured_seconds_replace_the_prediction() -> None:
    cost = _cost(1e6)
    c = choose_cadence(cost, step_seconds=0.1, budget=0.01, rollback_steps=100, max_steps=1000, measured_seconds=0.5)
    assert c.every == 500 and c.seconds_per_snapshot == 0.5


def test_no_room_in_host_memory_means_no_scheduled_snapshots() -> None:
    cost = _cost(7e9, host=100e9)  # 84 GB a snapshot, 100 GB available
    assert not cost.fits_host
    c = choose_cadence(cost, step_seconds=None, budget=0.01, rollback_steps=100, max_steps=None, save_every=None)
    assert c.every is None and c.reason is CadenceReason.NO_ROOM and "set save_steps" in c.message


def test_unknown_costs_keep_the_default() -> None:
    c = choose_cadence(None, step_seconds=None, budget=0.01, rollback_steps=100, max_steps=None)
    assert c.every == DEFAULT_EVERY and c.share is None


def test_the_cost_line_and_rows_carry_the_numbers() -> None:
    cost = _cost(7e9, bytes_per_value=2)
    c = choose_cadence(cost, step_seconds=1.0, budget=0.01, rollback_steps=100, max_steps=100_000, save_every=500)
    line = cost_line(cost, c, probe_fraction=0.05)
    assert line.startswith("recovery costs 1% of step time: snapshots of 70 GB")
    assert f"every {c.every} steps" in line and c.every == 4060 and "probes at most 5%" in line
    rows = {name: (value, warn) for name, value, warn, _ in cost_rows(cost, budget=0.01)}
    assert "70 GB" in rows["snapshot size"][0] and "14 GB" in rows["snapshot size"][0]
    assert rows["snapshot copy"][0].startswith("~7 s") and "finite check" not in rows["snapshot copy"][0]
    checked = {name: value for name, value, _, _ in cost_rows(replace(cost, check_bytes_per_s=7 * GB), budget=0.01)}
    # 70 GB copied at 10 GB/s, the 14 GB of bf16 weights checked at 7 GB/s
    assert checked["snapshot copy"] == "~9 s each (copy measured at 10 GB/s, finite check at 7 GB/s)"
    assert "35 s per spilled snapshot" in rows["spill disk"][0]


def test_the_cost_model_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; "
            "from lossguard.recovery.budget import choose_cadence; print(choose_cadence(None, step_seconds=1.0, "
            "budget=0.01, rollback_steps=100, max_steps=None).every)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "50", out.stderr


# --- measurements ----------------------------------------------------------------------------------
def test_optimizer_bytes_from_type_then_from_state() -> None:
    lin = torch.nn.Linear(100, 10)
    params = list(lin.parameters())
    opt = torch.optim.AdamW(params)
    assert optimizer_bytes(opt, params) == (2 * 1010 * 4, True)
    assert optimizer_bytes(torch.optim.SGD(params, lr=0.1), params) == (0, True)
    assert optimizer_bytes(torch.optim.SGD(params, lr=0.1, momentum=0.9), params) == (1010 * 4, True)
    lin(torch.ones(1, 100)).sum().backward()
    opt.step()
    held, estimated = optimizer_bytes(opt, params)
    assert not estimated and held == 2 * 1010 * 4 + 2 * 4  # two moments plus a float32 step per tensor


def test_capture_and_disk_are_measured(tmp_path) -> None:
    t = torch.randn(2**20)
    rate = measure_capture([t], sample_bytes=2**21)
    assert rate is not None and 1e7 < rate < 1e12
    check = measure_check([t], sample_bytes=2**21)
    assert check is not None and 1e7 < check < 1e13
    disk = measure_disk(tmp_path, 2**20)
    assert disk is not None and disk > 1e5
    assert list(tmp_path.iterdir()) == []  # the sample spills are gone
    assert measure_disk(None) is None
    (tmp_path / "blocked").write_text("not a folder")
    assert measure_disk(tmp_path / "blocked", 2**10) is None  # the writer fails: no bandwidth, no raise


def test_each_measurement_is_the_median_of_three() -> None:
    ticks = iter([0.0, 1.0, 10.0, 19.0, 30.0, 32.0])  # three copies of 1 s, 9 s and 2 s
    rate = measure_capture([torch.ones(256)], clock=lambda: next(ticks))
    assert rate == pytest.approx(1024 / 2.0)


def test_the_capture_prediction_adds_the_parameters_finite_check() -> None:
    cost = replace(_cost(1e9), capture_bytes_per_s=6 * GB, check_bytes_per_s=2 * GB)
    # 12 GB copied at 6 GB/s, the 4 GB of parameters checked at 2 GB/s
    assert cost.capture_seconds == pytest.approx(2.0 + 2.0)
    assert cost.summary()["check_bytes_per_s"] == 2 * GB


def test_all_finite_is_exact() -> None:
    x = torch.randn(10_000)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1234] = bad
        assert not all_finite(y) and not all_finite(y.bfloat16())
    both = x.clone()
    both[3], both[4] = float("inf"), -float("inf")
    assert not all_finite(both)
    huge = torch.full((10,), 3.0e38)  # its float32 sum overflows: the element-wise check decides
    assert all_finite(huge) and all_finite(torch.full((100,), 60000.0).half())
    assert all_finite(torch.arange(5))


def test_measure_cost_of_a_model(tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    from lossguard.probes.hessian import free_memory
    from lossguard.probes.probe_cost import probe_memory

    cost = measure_cost(model, opt, memory_mb=1.0, spill_dir=tmp_path, max_steps=None, free_memory=free_memory,
                        probe_memory=lambda k: probe_memory(k, vectors=30).device_bytes)
    n = 64 + 64 * 8 + 8
    assert cost.trainable_params == n and cost.param_bytes == 4 * n and cost.optimizer_bytes == 8 * n
    assert cost.capture_bytes_per_s and cost.disk_bytes_per_s and cost.host_available
    assert cost.probe_bytes == (30 + 6) * n * 4
    # a short run whose snapshots all fit in memory measures no disk
    assert measure_cost(model, opt, memory_mb=1.0, spill_dir=tmp_path, max_steps=100).disk_bytes_per_s is None


def test_the_recoverer_chooses_its_cadence_from_measured_snapshots(tmp_path) -> None:
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 256)).sum().backward()
    opt.step()
    ticks = iter(range(1000))
    rec = Recoverer(model, opt, config=RecoveryConfig(snapshot_budget=0.01), spill_dir=tmp_path,
                    clock=lambda: float(next(ticks)) * 0.5)  # every capture "takes" 0.5 s
    rec.cost = measure_cost(model, opt, memory_mb=512.0, spill_dir=tmp_path)
    rec.snapshot(0)
    assert rec.capture_seconds == [0.5]
    decided = [rec.observe_step(0.2) for _ in range(Recoverer.CADENCE_STEPS + 1)]
    assert decided == [False] * Recoverer.CADENCE_STEPS + [True]
    cadence = rec.choose_cadence(max_steps=100_000, save_every=None)
    rec.set_cadence(cadence)
    # 0.5 s per snapshot, 1% of 0.2 s steps: every 250 steps
    assert rec.every == 250 and cadence.reason is CadenceReason.COARSE
    assert rec.due(500) and not rec.due(50)
    assert not rec.observe_step(0.2)  # nothing new measured since


def test_a_user_cadence_is_kept() -> None:
    model = torch.nn.Linear(4, 4)
    rec = Recoverer(model, torch.optim.SGD(model.parameters(), lr=0.1), config=RecoveryConfig(snapshot_every=7))
    assert rec.every == 7
    for _ in range(Recoverer.CADENCE_STEPS + 1):
        ready = rec.observe_step(0.1)
    assert ready
    rec.set_cadence(rec.choose_cadence(max_steps=100, save_every=None))
    assert rec.every == 7 and rec.cadence.reason is CadenceReason.USER
    assert not rec.observe_step(0.1)


def test_a_snapshot_that_does_not_fit_the_host_is_never_taken(tmp_path) -> None:
    model = torch.nn.Linear(64, 64)
    rec = Recoverer(model, torch.optim.AdamW(model.parameters()), spill_dir=tmp_path)
    cost = measure_cost(model, rec.optimizer, memory_mb=512.0, spill_dir=tmp_path)
    from dataclasses import replace

    rec.set_cost(replace(cost, host_available=cost.snapshot_bytes))  # one snapshot needs all of it
    assert rec.cadence.reason is CadenceReason.NO_ROOM and rec.every is None
    assert rec.snapshot(0) is None and len(rec.ring) == 0 and not rec.due(0) and not rec.due(50)
