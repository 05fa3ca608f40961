"""Run under ``torchrun --nproc_per_node=2``: gloo on CPU, LossGuard with recovery, NaN on rank 1 only.

Each rank writes what it did to ``<out>/recovery.rank<N>.json``.
"""

import json
import os
import sys

import torch
from transformers import TrainerCallback

from lossguard import GuardConfig, LossGuard
from lossguard.recovery.snapshot import trainable_parameters
from lossguard.testing.tiny import make_trainer, tiny_setup

out = sys.argv[1]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)


class NanOnThisRank(TrainerCallback):
    def __init__(self, step: int):
        self.step, self.current = step, 0

    def on_train_begin(self, args, state, control, model=None, **kw):
        def hook(module, a, kwargs, output):
            if self.current == self.step and module.training:
                output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(hook, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kw):
        self.current = state.global_step + 1


setup = tiny_setup(n_train=128)
# snapshot_memory_mb ~0: every snapshot but the newest goes to disk, so both ranks spill at the same steps
guard = LossGuard(GuardConfig(console=False, recovery={"snapshot_every": 5, "rollback_steps": 5,
                                                        "max_low_lr_steps": 6, "relapse_watch_steps": 0,
                                                        "snapshot_memory_mb": 1e-6}))


class SpillSpy(TrainerCallback):
    """What the ring held on disk at the last step (train end deletes it)."""

    spilled: list = []

    def on_step_end(self, args, state, control, **kw):
        SpillSpy.spilled = list(guard.recovery.recoverer.ring.state_summary()["disk"])


# a snapshot an earlier, crashed run left behind: removed when this run's recovery starts
stale = os.path.join(out, "lossguard", "snapshots" if rank == 0 else f"snapshots-rank{rank}", "step-000000777")
os.makedirs(stale, exist_ok=True)
callbacks = [guard, SpillSpy()] + ([NanOnThisRank(12)] if rank == 1 else [])
trainer = make_trainer(setup, out, callbacks=callbacks, max_steps=24, learning_rate=1e-2,
                       per_device_train_batch_size=4, ddp_backend="gloo", logging_steps=50)
trainer.train()
params = trainable_parameters(setup.model)
with open(os.path.join(out, f"recovery.rank{rank}.json"), "w") as fh:
    json.dump({
        "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "actions": [a.to_record() for a in guard.actions],
        "final_step": trainer.state.global_step,
        "finite": all(bool(torch.isfinite(p).all()) for p in params.values()),
        "checksum": [float(p.double().sum()) for p in params.values()],
        "spill_dir": str(guard.recovery.recoverer.ring.spill_dir),
        "spilled": SpillSpy.spilled,
        "left_on_disk": sorted(os.listdir(guard.recovery.recoverer.ring.spill_dir)),
    }, fh)
# an orderly shutdown: gloo aborts at interpreter exit now and then without it
torch.distributed.barrier()
torch.distributed.destroy_process_group()
