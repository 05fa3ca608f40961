"""The tiny real run: lr 3e-2 genuinely stalls near the unigram level, lr 1e-2 learns.

Each learning rate is trained with a real Trainer on the demo's plan (600 steps, so the same
learning-rate schedule as ``make demo``) and stopped within the first half, the only part where
an early convergence can be reported (the stalled run after a third: it settles within 20 steps).
The per-step losses it logs are then fed to the detectors offline, through the streaming and the
batch path alike, with the references the callback would give them (the model's vocabulary, the
label tokens of the training rows).
"""

import numpy as np
import pytest

from lossguard.integrations.references import run_references
from lossguard.records import Columns, Reason, Sample, Severity
from lossguard.signals.suite import DetectorSuite

_PLANNED = 600


def _logged(tmp_path, lr, steps):
    from transformers import TrainerCallback

    from lossguard.testing.tiny import make_trainer, tiny_setup

    samples = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                samples.append(Sample(step=state.global_step, loss=logs["loss"], grad_norm=logs.get("grad_norm"),
                                      lr=logs.get("learning_rate"), epoch=logs.get("epoch")))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= steps:
                control.should_training_stop = True

    setup = tiny_setup()
    trainer = make_trainer(setup, str(tmp_path / str(lr)), callbacks=[Record()], max_steps=_PLANNED,
                           learning_rate=lr, logging_steps=1)
    refs = run_references(trainer, setup.model)
    trainer.train()
    return samples, refs


def _findings(logged):
    samples, refs = logged
    suite = DetectorSuite(max_steps=_PLANNED)
    suite.set_references(refs)
    found = [f for s in samples for f in suite.observe(s)]
    batch = DetectorSuite(max_steps=_PLANNED)
    batch.set_references(refs)
    again = batch.observe_many(Columns.from_samples(samples))
    assert [f.message for f in again] == [f.message for f in found]
    return found


@pytest.mark.slow
def test_too_high_lr_is_reported_as_early_convergence_and_a_good_lr_is_not(tmp_path):
    stuck = _logged(tmp_path, 3e-2, _PLANNED // 3)
    losses = [s.loss for s in stuck[0]]
    unigram = stuck[1].unigram
    assert stuck[1].uniform == pytest.approx(np.log(27)) and 2.0 < unigram < stuck[1].uniform
    assert len(losses) == _PLANNED // 3 and np.mean(losses[-50:]) > 0.9 * unigram  # it did stall, at the unigram level
    ec = [f for f in _findings(stuck) if f.reason == Reason.EARLY_CONVERGENCE]
    assert len(ec) == 1 and ec[0].step <= 150 and ec[0].severity == Severity.WARNING
    assert ec[0].evidence["confidence"] == "corroborated" and ec[0].evidence["reference"] == "unigram"
    assert 1 <= ec[0].onset_step <= 100 and ec[0].onset_step < ec[0].step

    good = _logged(tmp_path, 1e-2, _PLANNED // 2)
    losses = [s.loss for s in good[0]]
    assert np.mean(losses[-30:]) < 0.6 * np.mean(losses[:10])  # it learned
    assert not [f for f in _findings(good) if f.reason in (Reason.EARLY_CONVERGENCE, Reason.DIVERGENCE)
                and f.severity != Severity.INFO]
