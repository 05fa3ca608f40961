"""The tiny real run: lr 3e-2 genuinely stalls near the uniform-prediction loss, lr 1e-2 learns."""

import pytest

from lossguard.records import Reason, Sample
from lossguard.signals.suite import DetectorSuite


def _findings(tmp_path, lr):
    from transformers import TrainerCallback

    from lossguard.testing.tiny import make_trainer, tiny_setup

    suite = DetectorSuite(max_steps=400)
    found = []

    class Feed(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                s = Sample(step=state.global_step, loss=logs["loss"], grad_norm=logs.get("grad_norm"),
                           lr=logs.get("learning_rate"), epoch=logs.get("epoch"))
                found.extend(suite.observe(s))

    make_trainer(tiny_setup(), str(tmp_path / str(lr)), callbacks=[Feed()], max_steps=400,
                 learning_rate=lr, logging_steps=1).train()
    return found


@pytest.mark.slow
def test_too_high_lr_is_reported_as_early_convergence_and_a_good_lr_is_not(tmp_path):
    stuck = _findings(tmp_path, 3e-2)
    ec = [f for f in stuck if f.reason == Reason.EARLY_CONVERGENCE]
    assert len(ec) == 1 and ec[0].step <= 200 and ec[0].onset_step < ec[0].step
    good = _findings(tmp_path, 1e-2)
    assert not [f for f in good if f.reason in (Reason.EARLY_CONVERGENCE, Reason.DIVERGENCE)]
