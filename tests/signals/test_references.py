"""The no-learning levels and the objective: what a plateau is weighed against."""

import json
import math

import numpy as np
import pytest

from lossguard.analysis import analyze, offline_references
from lossguard.integrations.references import count_labels, label_references, model_references
from lossguard.records import Reason, Sample, Severity
from lossguard.signals.references import (
    Objective,
    References,
    entropy,
    objective_from_keys,
    objective_from_trainer,
)
from lossguard.signals.suite import DetectorSuite
from lossguard.telemetry.foreign import read_trainer_state


def test_entropy_is_miller_madow_corrected():
    assert entropy({1: 50, 2: 50}) == pytest.approx(math.log(2) + 1 / 200)
    assert entropy([10]) == pytest.approx(0.0)
    assert entropy({}) is None and entropy([0, 0]) is None


def test_labels_are_counted_without_ignored_or_first_positions():
    batch = {"labels": np.array([[5, 1, 2, -100], [7, 2, 2, 3]])}
    assert count_labels([batch], shift=True) == {1: 1, 2: 3, 3: 1}
    assert count_labels([batch], shift=False) == {5: 1, 7: 1, 1: 1, 2: 3, 3: 1}
    assert count_labels([{"labels": [0, 1, 1, -100]}], shift=False) == {0: 1, 1: 2}  # one class per row
    assert count_labels([{"labels": [[4, 4, 5], [4, 6]]}], shift=True) == {4: 1, 5: 1, 6: 1}  # ragged rows


def test_label_references_use_the_collator_and_leave_rng_alone():
    import torch

    rows = [{"input_ids": [1, 2, 3, 4]} for _ in range(10)]

    def collate(batch):
        torch.rand(3)  # a collator that draws (masking, packing): the generator must be put back
        return {"labels": torch.tensor([r["input_ids"] for r in batch])}

    torch.manual_seed(0)
    before = torch.get_rng_state()
    refs = label_references(rows, collate)
    assert torch.equal(torch.get_rng_state(), before)
    assert refs.unigram == pytest.approx(math.log(3) + 2 / 60)  # tokens 2, 3, 4 alike, 30 of them
    assert "30 label tokens" in refs.sources["unigram"]


def test_uniform_level_from_the_model():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    assert model_references(LlamaForCausalLM(cfg)).uniform == pytest.approx(math.log(50))
    assert model_references(LlamaForSequenceClassification(cfg)).uniform == pytest.approx(math.log(3))


def test_objective_from_trainer_class_and_log_keys():
    class DPOTrainer:
        pass

    class GRPOTrainer:
        pass

    class Trainer:
        pass

    class MySFT(Trainer):
        pass

    assert objective_from_trainer(DPOTrainer()) is Objective.PREFERENCE
    assert objective_from_trainer(GRPOTrainer()) is Objective.RL
    assert objective_from_trainer(MySFT()) is Objective.CROSS_ENTROPY
    assert objective_from_trainer(None) is Objective.UNKNOWN
    assert objective_from_keys(["loss", "rewards/chosen", "logps/rejected"]) is Objective.PREFERENCE
    assert objective_from_keys(["loss", "kl", "reward", "completion_length"]) is Objective.RL
    assert objective_from_keys(["loss", "learning_rate", "grad_norm", "epoch", "step"]) is Objective.UNKNOWN


def test_references_round_trip_and_survive_junk():
    refs = References(uniform=3.3, unigram=2.9, objective=Objective.CROSS_ENTROPY, sources={"unigram": "x"})
    assert References.from_dict(json.loads(json.dumps(refs.to_dict()))) == refs
    junk = References.from_dict({"uniform": "abc", "unigram": -1, "objective": "nope", "sources": 3})
    assert junk == References()
    assert References.from_dict(None) == References()
    assert refs.nearest(2.8, 0.1) == ("unigram", 2.9)
    assert refs.nearest(2.5, 0.1) is None
    assert refs.nearest(3.5, 0.1) == ("unigram", 2.9)  # above a level is at it: nothing learned


def test_a_preference_objective_switches_convergence_checks_off_and_a_small_loss_does_not():
    suite = DetectorSuite(max_steps=1000)
    suite.set_references(References(objective=Objective.PREFERENCE, sources={"objective": "trainer class DPOTrainer"}))
    # flat, then climbing; from 0.5, not ln 2, so that only the convergence readers could see it
    # (a sigmoid preference loss from ln 2 is read against that level: tests/signals/test_preference.py)
    found = [f for i in range(1, 400) for f in suite.observe(Sample(step=i, loss=0.5 + 0.002 * max(0, i - 200)))]
    assert [f.reason for f in found] == [Reason.NOT_A_CONVERGENCE_SIGNAL]
    assert "DPOTrainer" in found[0].message and found[0].step == 1

    # a seq2seq loss that is small and climbs 15x from its minimum is a real divergence to judge
    small = DetectorSuite(max_steps=4000)
    rng = np.random.default_rng(0)
    losses = [0.003 * (1 + 0.05 * rng.standard_normal()) for _ in range(500)]
    losses += [0.003 * np.exp(np.log(15) * k / 1500) * (1 + 0.05 * rng.standard_normal()) for k in range(1500)]
    found = [f for i, v in enumerate(losses, 1) for f in small.observe(Sample(step=i, loss=v))]
    assert Reason.NOT_A_CONVERGENCE_SIGNAL not in {f.reason for f in found}
    assert Reason.DIVERGENCE in {f.reason for f in found}


def test_offline_objective_from_a_dpo_trainer_state(tmp_path):
    history = [{"step": i, "loss": 0.6931 - 0.0001 * i, "rewards/chosen": 0.01 * i, "rewards/rejected": -0.01 * i,
                "learning_rate": 5e-7, "epoch": i / 300} for i in range(1, 301)]
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"log_history": history, "max_steps": 900, "num_train_epochs": 3}))
    log = read_trainer_state(path)
    assert offline_references(log).objective is Objective.PREFERENCE
    reasons = [f.reason for f in analyze(log).findings]
    assert reasons == [Reason.NOT_A_CONVERGENCE_SIGNAL]


def test_offline_plateau_without_references_is_information_only(tmp_path):
    # flat from the start, early in the run: without the vocabulary or the labels a log cannot say
    # whether 2.5 is the level of a model that learned nothing or all the data allows
    steps = np.arange(1, 401)
    loss = 2.5 + 0.02 * np.random.default_rng(1).standard_normal(len(steps))
    history = [{"step": int(s), "loss": float(v), "learning_rate": 2e-5, "epoch": s / 1000} for s, v in zip(steps, loss)]
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"log_history": history, "max_steps": 3000, "num_train_epochs": 3}))
    found = [f for f in analyze(read_trainer_state(path)).findings if f.reason is Reason.EARLY_CONVERGENCE]
    assert found and all(f.severity is Severity.INFO and f.evidence["confidence"] == "shape_only" for f in found)
    assert all("no reference level" in f.message for f in found)
