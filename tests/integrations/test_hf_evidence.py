"""The callback's evidence on real Trainer runs: a run that learns cleanly is left alone, and
the log carries the references and the evaluations its findings were weighed against."""

import math

import pytest

from lossguard import GuardConfig, LossGuard
from lossguard.analysis import analyze
from lossguard.records import ActionKind, Severity
from lossguard.telemetry.source import open_run
from lossguard.testing.tiny import eval_loss, make_trainer, tiny_setup


@pytest.mark.slow
def test_a_clean_full_fine_tune_is_left_alone_and_its_log_holds_the_evidence(tmp_path):
    # the reversal task learned from scratch at lr 3e-3: 3.3 -> far below the unigram level
    setup = tiny_setup(lora=False)
    guard = LossGuard(GuardConfig(console=False, gpu={"enabled": False}))
    trainer = make_trainer(setup, str(tmp_path), callbacks=[guard], max_steps=300, learning_rate=3e-3,
                           logging_steps=10, eval_strategy="steps", eval_steps=100)
    trainer.train()
    held_out = eval_loss(setup.model, setup.eval, setup.collator)
    assert held_out < 2.0  # it learned: far below the unigram level (~2.9)

    log = open_run(tmp_path)
    assert not [a for a in log.actions if a.action is ActionKind.ROLLBACK]
    assert not [f for f in analyze(log).findings if f.severity is not Severity.INFO]
    refs = log.references
    assert refs["uniform"] == pytest.approx(math.log(27)) and 2.0 < refs["unigram"] < refs["uniform"]
    assert refs["objective"] == "cross_entropy" and "label tokens" in refs["sources"]["unigram"]
    assert [e["step"] for e in log.evals] == [100, 200, 300]
    assert all(e["eval_loss"] > 0 for e in log.evals)
