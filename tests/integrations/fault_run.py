"""A tiny real Trainer run under an injected fault, in its own process (``python fault_run.py OUT SCENARIO``).

Scenarios:
- ``kill_after_trainer_state``: a NaN at step 14 (rollback, low LR until past step 20), and a
  kill -9 right after the Trainer wrote ``checkpoint-20/trainer_state.json``.
"""

import json
import sys

import torch
from fault_inject import NanAt, kill_after_trainer_state

from lossguard import GuardConfig, LossGuard
from lossguard.testing.tiny import make_trainer, tiny_setup

out, scenario = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
tiny = tiny_setup(n_train=128)
recovery = {"snapshot_every": 5, "rollback_steps": 10, "max_low_lr_steps": 8, "relapse_watch_steps": 0}
if scenario == "kill_after_trainer_state":
    recovery["max_low_lr_steps"] = 30
    guard = LossGuard(GuardConfig(console=False, recovery=recovery))
    trainer = make_trainer(tiny, out, callbacks=[guard, NanAt([14])], max_steps=40, learning_rate=1e-2,
                           logging_steps=50, save_strategy="steps", save_steps=20)
    kill_after_trainer_state(20)
else:
    raise SystemExit(f"unknown scenario {scenario}")
trainer.train()
print(json.dumps({"global_step": trainer.state.global_step, "rollbacks": guard.engine.policy.rollbacks}))
