"""Testbed scenarios: each builds real Trainer pieces, and a troubled one shows its known shape."""

from __future__ import annotations

import math
import statistics

import pytest

from lossguard.testing.corpus import Label
from lossguard.testing.testbed.scenarios import SCENARIOS, make_trainer, run_scenario


def test_every_scenario_builds_a_trainer(tmp_path, one_torch_thread):
    assert {"sft-lora-1epoch", "sft-full-3epoch", "lr-too-high", "classify-collapse", "corrupted-examples",
            "fp16-overflow"} <= set(SCENARIOS)
    for name, sc in SCENARIOS.items():
        Label(sc.expected)
        pieces = sc.build()
        trainer = make_trainer(pieces, str(tmp_path / name))
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        assert 0 < trainable <= total
        assert all(any(v != -100 for v in ex["labels"]) for ex in pieces.train), name


@pytest.mark.slow
def test_misaligned_labels_sit_at_the_label_prior_entropy(tmp_path, one_torch_thread):
    """Labels shuffled apart from their inputs: nothing beyond the label frequencies can be learned,
    so the loss falls from the base's level to the prior's entropy (0.914 nats) and stays."""
    r = run_scenario("classify-collapse", str(tmp_path), max_steps=120)
    h = r.outcome["prior_entropy"]
    assert r.losses[0] > h + 1.0
    tail = statistics.mean(r.losses[-40:])
    assert abs(tail - h) < 0.15, (tail, h)
    assert abs(r.outcome["eval_loss_after"] - h) < 0.2
    assert r.outcome["accuracy"] <= r.outcome["majority_share"] + 0.1
    assert all(math.isfinite(v) for v in r.losses)
