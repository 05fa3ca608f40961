"""Run under ``torchrun --nproc_per_node=2``: gloo on CPU, a forced false alarm judged by the safety net.

Each rank scores its own shard of the evaluation set; the scores are all-reduced, so both ranks
must reach the same verdict at the same step. Each rank writes what it did to
``<out>/safety.rank<N>.json``.
"""

import json
import os
import sys

import torch
from transformers import TrainerCallback

from lossguard import GuardConfig, LossGuard
from lossguard.records import Finding, Reason, Severity
from lossguard.recovery.snapshot import trainable_parameters
from lossguard.testing.tiny import make_trainer, tiny_setup

out = sys.argv[1]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)

setup = tiny_setup(n_train=128)
guard = LossGuard(GuardConfig(console=False, probe={"enabled": False},
                              recovery={"snapshot_every": 5, "rollback_steps": 5, "max_low_lr_steps": 20,
                                        "relapse_watch_steps": 0, "judge_sequences": 32}))


def checksum(params):
    return [float(p.double().sum()) for p in params.values()]


class Forced(TrainerCallback):
    """A spike finding at step 10 on every rank (a false alarm), and the states around it."""

    head: list = []
    after_revert: list = []

    def on_train_begin(self, args, state, control, **kw):
        detectors = guard.engine.detectors
        observe = detectors.observe

        def forced(sample):
            found = observe(sample)
            if sample.step == 10:
                found.append(Finding(Reason.SPIKE, Severity.WARNING, 10, 10, "forced", detector="test"))
            return found

        detectors.observe = forced

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == 10:
            Forced.head = checksum(guard.recovery.recoverer.head.params)
        if state.global_step == 15:
            Forced.after_revert = checksum(trainable_parameters(model))


trainer = make_trainer(setup, out, callbacks=[guard, Forced()], max_steps=24, learning_rate=1e-2,
                       per_device_train_batch_size=4, per_device_eval_batch_size=4, ddp_backend="gloo",
                       logging_steps=50)
trainer.train()
params = trainable_parameters(setup.model)
with open(os.path.join(out, f"safety.rank{rank}.json"), "w") as fh:
    json.dump({
        "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "actions": [a.to_record() for a in guard.actions],
        "judge_rows": guard.judge.rows,
        "head": Forced.head,
        "after_revert": Forced.after_revert,
        "checksum": checksum(params),
        "final_step": trainer.state.global_step,
    }, fh)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
