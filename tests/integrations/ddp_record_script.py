"""Run under ``torchrun --nproc_per_node=2``: a tiny LoRA fine-tune, gloo on CPU, LossGuard attached.

Each rank writes the step losses it fed to its detectors to ``<out>/seen.rank<N>.json``.
"""

import json
import os
import sys

import torch

from lossguard import GuardConfig, LossGuard
from lossguard.integrations import dist
from lossguard.testing.tiny import make_trainer, tiny_setup

out = sys.argv[1]
seen = []
_original = dist.mean_loss_and_sum_tokens


def spy(loss, tokens):
    reduced = _original(loss, tokens)
    seen.append({"local": loss, "reduced": reduced[0], "tokens": reduced[1]})
    return reduced


dist.mean_loss_and_sum_tokens = spy
setup = tiny_setup(n_train=128)
guard = LossGuard(GuardConfig(console=False, recovery={"enabled": False}))
trainer = make_trainer(setup, out, callbacks=[guard], max_steps=5, learning_rate=1e-2,
                       per_device_train_batch_size=4, ddp_backend="gloo")
trainer.train()
rank = int(os.environ["RANK"])
with open(os.path.join(out, f"seen.rank{rank}.json"), "w") as fh:
    json.dump({"world": dist.world_size(), "seen": seen}, fh)
# an orderly shutdown: gloo aborts at interpreter exit now and then without it
torch.distributed.barrier()
torch.distributed.destroy_process_group()
