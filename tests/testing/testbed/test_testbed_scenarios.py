"""Testbed scenarios: each builds real Trainer pieces, and a troubled one shows its known shape."""

from __future__ import annotations

import math
import statistics

import pytest

from lossguard import GuardConfig, LossGuard
from lossguard.records import Severity
from lossguard.testing.corpus import Label
from lossguard.testing.testbed.scenarios import SCENARIOS, make_trainer, run_scenario


def test_every_scenario_builds_a_trainer(tmp_path, one_torch_thread):
    assert {"sft-lora-1epoch", "sft-full-3epoch", "lr-too-high", "classify-collapse", "corrupted-examples",
            "fp16-overflow", "dpo-lora", "dpo-same-pair", "dpo-lr-too-high"} <= set(SCENARIOS)
    for name, sc in SCENARIOS.items():
        Label(sc.expected)
        pieces = sc.build()
        trainer = make_trainer(pieces, str(tmp_path / name))
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        assert 0 < trainable <= total
        if pieces.notes.get("trainer") == "dpo":  # TRL's DPOTrainer: preference rows, a LoRA adapter built by TRL
            assert type(trainer).__name__ == "DPOTrainer" and trainable < total / 10
            assert all(ex["prompt"] and ex["chosen"] and ex["rejected"] for ex in pieces.train), name
            continue
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


@pytest.mark.slow
def test_healthy_dpo_is_read_as_a_preference_loss_and_raises_nothing(tmp_path, one_torch_thread):
    """TRL's DPOTrainer on the testbed base (LoRA): the loss starts at ln 2 and falls; lossguard
    reads the objective from the trainer's class and raises no warning or critical finding."""
    from datasets.utils.logging import disable_progress_bar

    from lossguard.telemetry.reader import read_events

    disable_progress_bar()
    guard = LossGuard(GuardConfig(console=False, recovery={"enabled": False}))
    trainer = make_trainer(SCENARIOS["dpo-lora"].build(), str(tmp_path), callbacks=[guard], max_steps=12)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 12 and abs(losses[0] - math.log(2)) < 1e-3, losses[:2]
    assert statistics.mean(losses[-6:]) < 0.5, losses  # learning: well below ln 2
    refs = [e for e in read_events(tmp_path / "lossguard" / "events.jsonl") if e.get("kind") == "references"]
    assert refs and refs[-1]["objective"] == "preference", refs
    assert [f.reason.value for f in guard.findings] == ["not_a_convergence_signal"], guard.findings
    assert all(f.severity.rank < Severity.WARNING.rank for f in guard.findings)
