"""The callback's companions on a real Trainer run: preflight, the GPU sampler, the saddle probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from lossguard import GuardConfig, LossGuard
from lossguard.gpu.replay import ReplayBackend
from lossguard.telemetry import read_events
from lossguard.testing.tiny import make_trainer

pytestmark = pytest.mark.slow

GPU_DATA = Path(__file__).resolve().parent.parent / "data" / "gpu"


def test_a_stalled_run_gets_preflight_gpu_records_and_a_probed_plateau(tiny, tmp_path):
    backend = ReplayBackend.from_file(GPU_DATA / "placement_two_gpus.json")
    config = GuardConfig(console=False, recovery={"enabled": False},
                         gpu={"interval_s": 0.02},
                         probe={"batch_size": 16, "max_iter": 24, "max_time_fraction": 1.0})
    guard = LossGuard(config, gpu_backend=backend)
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[guard], max_steps=500, learning_rate=3e-2,
                           logging_steps=50)
    trainer.train()
    records = read_events(tmp_path / "lossguard" / "events.jsonl")
    kinds = [r["kind"] for r in records]

    preflight = next(r for r in records if r["kind"] == "preflight")
    rows = {row["name"]: row for row in preflight["rows"]}
    assert any("batch" in name.lower() for name in rows)
    assert kinds.index("preflight") < kinds.index("sample")

    gpu = [r for r in records if r["kind"] == "gpu"]
    assert len(gpu) >= 5  # one per logging interval (10 logs) and a last one at the end
    assert {g["index"] for g in gpu[0]["gpus"]} == {0, 1}
    assert any(d["kind"] == "placement_model_parallel" for r in gpu for d in r.get("diagnoses", []))

    plateau = [r for r in records if r["kind"] == "finding" and r["reason"] == "early_convergence"]
    assert len(plateau) == 1
    probes = [r for r in records if r["kind"] == "probe"]
    # probed when the policy heard of the plateau (the detectors' next batch), on that step's weights
    every = config.detection.batch_steps
    assert len(probes) == 1 and probes[0]["step"] == -(-plateau[0]["step"] // every) * every
    probe = probes[0]
    assert probe["trigger"] == "early_convergence" and not probe.get("skipped")
    assert probe["verdict"] in ("saddle", "inconclusive", "minimum", "degenerate")
    assert probe["lambda_max"] > 0 and probe["n_hvp"] <= 2 * 24 + 2
    assert probe["ratio"] == pytest.approx(probe["lambda_min"] / probe["lambda_max"])
    assert plateau[0]["evidence"]["probe"]["verdict"] == probe["verdict"]
    assert f"Hessian probe: {probe['verdict']}" in plateau[0]["message"]
    eos = probe["edge_of_stability"]
    assert eos["sharpness"] == pytest.approx(probe["lambda_max"]) and eos["optimizer"] == "adam"
    assert eos["sharpness_x_lr"] == pytest.approx(probe["lambda_max"] * eos["lr"])
    assert probe["probe_seconds_total"] == pytest.approx(guard.probe.seconds, abs=1e-3)


def test_probe_budget_is_a_share_of_the_expected_run_time(tiny):
    from lossguard.config import ProbeConfig
    from lossguard.integrations.hf_probe import TrainerProbe

    t = [0.0]
    probe = TrainerProbe(ProbeConfig(max_time_fraction=0.05, batch_size=16), clock=lambda: t[0])
    probe.begin(tiny.model, warmup_steps=0, max_steps=1000)
    assert probe.budget_left() == 0.0  # no step timed yet: nothing to budget from
    for _ in range(10):
        probe.observe_step(0.1)
    assert probe.budget_left() == pytest.approx(0.05 * 1000 * 0.1)
    probe.seconds = 5.0  # the whole budget already spent
    record = probe.run(step=50, lr=1e-3, why="early_convergence")
    assert record["skipped"] and record["reason"] == "budget" and "5%" in record["message"]


def test_probe_verdict_can_gate_recovery(tiny, tmp_path):
    """With plateau_needs_saddle, a plateau rolls back only when the probe finds negative curvature."""
    config = GuardConfig(console=False, gpu={"enabled": False},
                         recovery={"plateau_needs_saddle": True},
                         probe={"batch_size": 16, "max_iter": 24, "max_time_fraction": 1.0})
    guard = LossGuard(config)
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[guard], max_steps=500, learning_rate=3e-2,
                           logging_steps=50)
    trainer.train()
    records = read_events(tmp_path / "lossguard" / "events.jsonl")
    plateau = next(r for r in records if r["kind"] == "finding" and r["reason"] == "early_convergence")
    verdict = plateau["evidence"]["probe"]["verdict"]
    rollbacks = [r for r in records if r["kind"] == "action" and r["action"] == "rollback"
                 and r["reason"] == "early_convergence"]
    if verdict in ("minimum", "degenerate"):
        assert rollbacks == []
    else:
        # acted on at the detectors' next batch: the first multiple of batch_steps from the finding on
        every = config.detection.batch_steps
        assert rollbacks and rollbacks[0]["step"] == -(-plateau["step"] // every) * every
