"""Run under ``torchrun --nproc_per_node=2``: gloo on CPU, a forced false alarm judged by the safety net.

Each rank scores its own shard of the evaluation set; the scores are all-reduced, so both ranks
must reach the same decision at the same step: the same decline before the rollback, and (with the
look-before switched off) the same verdict on the trial. Each rank writes what it did to
``<out>/<declined|tried>.rank<N>.json``.
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


def checksum(params):
    return [float(p.double().sum()) for p in params.values()]


def run(name: str, precheck: bool, inject: bool = True) -> None:
    """A forced spike finding at step 10 on every rank (a false alarm), and the states around it.
    With ``precheck`` the rollback is declined (the head beats the snapshot of step 5); without,
    it is tried and reverted at step 15."""
    setup = tiny_setup(n_train=128)
    guard = LossGuard(GuardConfig(console=False, probe={"enabled": False},
                                  recovery={"snapshot_every": 5, "rollback_steps": 5, "max_low_lr_steps": 20,
                                            "relapse_watch_steps": 0, "judge_sequences": 32,
                                            "precheck": precheck}))
    seen: dict = {}

    class Forced(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            detectors = guard.engine.detectors
            observe = detectors.observe

            def forced(sample):
                found = observe(sample)
                if inject and sample.step == 10:
                    found.append(Finding(Reason.SPIKE, Severity.WARNING, 10, 10, "forced", detector="test"))
                return found

            detectors.observe = forced

        def on_step_end(self, args, state, control, model=None, **kw):
            head = guard.recovery.recoverer.head
            if state.global_step == 10:
                seen["head"] = checksum(head.params) if head is not None else None
                seen["after_decision"] = checksum(trainable_parameters(model))
            if state.global_step == 15:
                seen["after_revert"] = checksum(trainable_parameters(model))

    trainer = make_trainer(setup, os.path.join(out, name), callbacks=[guard, Forced()], max_steps=24,
                           learning_rate=1e-2, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                           ddp_backend="gloo", logging_steps=50)
    trainer.train()
    with open(os.path.join(out, f"{name}.rank{rank}.json"), "w") as fh:
        json.dump({
            "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "actions": [a.to_record() for a in guard.actions],
            "findings": [f.to_record() for f in guard.findings],
            "judge_rows": guard.judge.rows,
            **seen,
            "checksum": checksum(trainable_parameters(setup.model)),
            "final_step": trainer.state.global_step,
        }, fh)


run("plain", precheck=True, inject=False)
run("declined", precheck=True)
run("tried", precheck=False)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
