"""The Trainer's probe runner: the estimate it hands the probe, and what it learns from one."""

from __future__ import annotations

import pytest
import torch

from lossguard.config import ProbeConfig
from lossguard.integrations.hf_probe import PRIOR_STEPS, TrainerProbe


@pytest.fixture
def kept(tiny):
    return [tiny.collator(tiny.train[i * 4:(i + 1) * 4]) for i in range(8)]


def _forwards(model) -> list[int]:
    count = [0]

    def hook(*_: object) -> None:
        count[0] += 1

    model.register_forward_pre_hook(hook)
    return count


def test_a_probe_the_step_time_cannot_pay_for_costs_nothing(tiny, kept):
    with torch.no_grad():
        for name, p in tiny.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    probe = TrainerProbe(ProbeConfig(max_time_fraction=0.05))
    probe.begin(tiny.model, warmup_steps=0, max_steps=100, micro_batches=2)
    probe.batches = kept
    for _ in range(10):
        probe.observe_step(0.2)
    # 5% of 100 x 0.2 s = 1 s; a product is estimated at 0.75 x 0.2 / 2 = 0.075 s per micro-batch,
    # and the smallest probe (2 groups x 10 products) needs 1.5 s
    assert probe.product_seconds() == pytest.approx(PRIOR_STEPS * 0.2 / 2)
    forwards = _forwards(tiny.model)
    record = probe.run(step=50, lr=1e-3, why="early_convergence")
    assert record["skipped"] and record["reason"] == "too_expensive"
    assert "estimated before probing" in record["message"] and record["plan"]["products"] == 10
    assert forwards[0] == 0 and record["probe_seconds_total"] < 0.5


def test_the_runner_keeps_the_measured_product_time(tiny, kept):
    with torch.no_grad():
        for name, p in tiny.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    probe = TrainerProbe(ProbeConfig(max_time_fraction=1.0, max_iter=12, max_seconds=120.0))
    probe.begin(tiny.model, warmup_steps=0, max_steps=1000, micro_batches=1)
    probe.batches = kept
    probe.observe_step(1.0)
    record = probe.run(step=50, lr=1e-3, why="every_n_steps")
    assert not record.get("skipped"), record
    assert record["product_seconds"] > 0 and record["hvp"]["method"] in ("double_backward", "finite_difference")
    assert probe.product_seconds() == pytest.approx(record["product_seconds"])
    assert record["plan"]["micro_batches"] >= 1 and record["n_hvp"] >= 2 * 10
