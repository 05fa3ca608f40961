"""Run under ``torchrun --nproc_per_node=2``: FSDP2 (``fully_shard``) on CPU, gloo, a hand-written loop
with ``LoopGuard``; rank 1's own shard of one weight turns NaN.

After optimizer step 10 a NaN is written into rank 1's local shard of one weight (rank 0's shard is
untouched): the snapshot due at step 10 is refused on both ranks, step 11's loss is NaN on both
(the forward all-gathers the shard), both roll back to step 6 (read back from each rank's own
spill folder) and train on at 0.1 x the LR. Each
rank writes what it saw to ``<out>/fsdp.rank<N>.json``; the test compares the ranks.
"""

import json
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lossguard import GuardConfig, LoopGuard, LossGuard, ProbeConfig, load_checkpoint
from lossguard.integrations import core
from lossguard.integrations.engines import detect
from lossguard.integrations.hf_probe import TrainerProbe
from lossguard.probes.hessian import probe_model
from lossguard.records import Finding, Reason, Severity
from lossguard.testing.tiny import (
    PadCollator,
    build_dataset,
    build_model,
    build_tokenizer,
    make_trainer,
    tiny_setup,
)

out = sys.argv[1]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
STEPS, POISON, BASE_LR = 24, 10, 3e-3


def sharded_model(tok):
    model = build_model(tok, seed=0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def schedule(i):
    return 1.0 - i / (2 * STEPS)


def local_state(model, opt):
    """This rank's shards: parameters and optimizer state, cloned."""
    params = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: {k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone()
                            for k, v in s.items()} for p, s in opt.state.items()}
    return params, state


def same(a, b):
    pa, sa = a
    pb, sb = b
    return (pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
            and sa.keys() == sb.keys() and all(sa[n].keys() == sb[n].keys() and all(torch.equal(sa[n][k], sb[n][k])
                                                                                    for k in sa[n]) for n in sa))


def full_checksum(model):
    return [float(p.full_tensor().double().sum()) for p in model.parameters()]


tok = build_tokenizer()
model = sharded_model(tok)
opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR)
sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
data = build_dataset(tok, STEPS * 4, seed=100 + rank)  # each rank its own batches
collate = PadCollator(tok.pad_token_id)
judge = [collate(build_dataset(tok, 8, seed=500 + rank))]
guard = LoopGuard(model, opt, sched, log_dir=os.path.join(out, "lossguard"), max_steps=STEPS,
                  checkpoint_dir=os.path.join(out, "ckpt"), judge_batches=judge,
                  config=GuardConfig(console=False, recovery={"snapshot_every": 2, "rollback_steps": 4,
                                                              "max_low_lr_steps": 6, "relapse_watch_steps": 0,
                                                              "judge_sequences": 16,
                                                              # ~0: all but the newest snapshot go to disk
                                                              "snapshot_memory_mb": 1e-6}))
lr_used = {}
opt.register_step_pre_hook(lambda o, a, k: lr_used.__setitem__(guard.global_step + 1, o.param_groups[0]["lr"]))
record = {"world": dist.get_world_size(), "engine": guard.engine_info.to_record(), "losses": {}, "rings": {},
          "scheduled": {}, "norms": {}}
snapshots = {0: local_state(model, opt)}
target = "model.layers.1.mlp.down_proj.weight"
for i in range(STEPS):
    step = i + 1
    loss = model(**collate(data[i * 4:(i + 1) * 4])).loss
    loss.backward()
    if step == 3:  # the guard's norm over the shards, against the gathered gradients
        mine = float(core.grad_norm(model.parameters()))
        reference = float(torch.linalg.vector_norm(torch.cat([p.grad.full_tensor().reshape(-1)
                                                              for p in model.parameters()])))
        record["norms"] = {"guard": mine, "gathered": reference}
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    record["scheduled"][step] = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad()
    if step == POISON and rank == 1:
        with torch.no_grad():
            dict(model.named_parameters())[target].to_local()[0, 0] = float("nan")
    result = guard.step(loss, grad_norm=total)
    record["losses"][step] = float(loss)
    record["rings"][step] = list(guard.recoverer.ring.steps())
    record.setdefault("on_disk", {})[step] = list(guard.recoverer.ring.state_summary()["disk"])
    record["spill_dir"] = str(guard.recoverer.ring.spill_dir)
    if step in guard.recoverer.ring and step not in snapshots:
        snapshots[step] = local_state(model, opt)
        record.setdefault("snapshot_checksums", {})[step] = full_checksum(model)
    if result.rolled_back_to is not None:
        record["rollback"] = {"step": step, "to": result.rolled_back_to,
                              "bitwise": same(local_state(model, opt), snapshots[result.rolled_back_to]),
                              "checksum": full_checksum(model)}
        snap = guard.recoverer.ring.get(result.rolled_back_to)
        shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        shard += sum((v.to_local() if isinstance(v, DTensor) else v).numel() * v.element_size()
                     for s in opt.state.values() for v in s.values())
        whole = sum(p.numel() * p.element_size() for p in model.parameters())
        cost = guard.recoverer.cost
        record["memory"] = {"snapshot": snap.nbytes, "shard": shard, "whole_params": whole,
                            "predicted": cost.snapshot_bytes if cost is not None else None}
guard.close()
record["lr_used"] = lr_used
record["actions"] = [a.to_record() for a in guard.actions]
record["final_finite"] = all(bool(torch.isfinite(p.to_local()).all()) for p in model.parameters())
record["final_checksum"] = full_checksum(model)

# the fallback checkpoint (DCP) resumes into a fresh FSDP2 model and optimizer, bitwise
saves = [a for a in guard.actions if a.action.value == "save" and a.from_step is not None]
fresh = sharded_model(tok)
fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=BASE_LR)
state = load_checkpoint(saves[0].details["path"], fresh, fresh_opt)
record["resumed"] = {"path": saves[0].details["path"], "bitwise": same(local_state(fresh, fresh_opt),
                                                                        snapshots[saves[0].from_step]),
                     "global_step": state["global_step"]}
loss = fresh(**collate(data[:4])).loss
loss.backward()
fresh_opt.step()
record["resumed"]["trains"] = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.to_local()).all())
                                                                 for p in fresh.parameters())

# the safety net on sharded state: a forced false alarm at step 10, judged at step 15 on pooled scores
guard2 = LoopGuard(model, opt, sched, max_steps=STEPS, judge_batches=judge,
                   config=GuardConfig(console=False, recovery={"snapshot_every": 5, "rollback_steps": 5,
                                                               "max_low_lr_steps": 20, "relapse_watch_steps": 0,
                                                               "judge_sequences": 16, "precheck": False}))


def force_spike(guard, at, onset):
    """The guard's detectors also report a spike at step ``at`` (onset ``onset``): a forced false alarm."""
    observe = guard.engine.detectors.observe

    def forced(sample):
        found = observe(sample)
        if sample.step == at:
            found.append(Finding(Reason.SPIKE, Severity.WARNING, at, onset, "forced", detector="test"))
        return found

    guard.engine.detectors.observe = forced


force_spike(guard2, 10, 10)
for i in range(20):
    loss = model(**collate(data[i * 4:(i + 1) * 4])).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    result = guard2.step(loss)
    if guard2.global_step == 10:
        record["head_checksum"] = [float(t.double().sum()) for t in guard2.recoverer.head.params.values()]
    if any(a.action.value == "revert" for a in result.actions):
        record["after_revert"] = [float(p.to_local().double().sum()) for p in model.parameters()]
guard2.close()
record["verdicts"] = [a.to_record() for a in guard2.actions if a.action.value in ("keep", "revert")]

# the look before rolling back on sharded state: a fresh model, a forced spike at step 12 with its
# onset at step 3; the head is compared with the snapshot before the onset (each rank loads its own shards)
model3 = sharded_model(tok)
opt3 = torch.optim.AdamW(model3.parameters(), lr=BASE_LR)
guard3 = LoopGuard(model3, opt3, max_steps=STEPS, judge_batches=judge,
                   config=GuardConfig(console=False, recovery={"snapshot_every": 5, "rollback_steps": 5,
                                                               "judge_sequences": 16}))
force_spike(guard3, 12, 3)
for i in range(20):
    loss = model3(**collate(data[i * 4:(i + 1) * 4])).loss
    loss.backward()
    opt3.step()
    opt3.zero_grad()
    before = [float(p.to_local().double().sum()) for p in model3.parameters()]
    result = guard3.step(loss)
    if any(a.action.value == "decline" for a in result.actions):  # (the finding is acted on at a flush)
        record["before_decline"] = before
        record["after_decline"] = [float(p.to_local().double().sum()) for p in model3.parameters()]
guard3.close()
record["precheck_actions"] = [a.to_record() for a in guard3.actions]

# the Hessian probe: a recorded skip on every rank, never a verdict from one shard
probe = TrainerProbe(ProbeConfig(enabled=True))
probe.begin(model, warmup_steps=0, max_steps=STEPS)
probe.batches = judge
record["probe_record"] = probe.run(STEPS, 1e-3, "test")
direct = probe_model(model, judge, config=ProbeConfig(enabled=True), step=STEPS)
record["probe_direct"] = {"reason": direct.reason, "message": direct.message}

# engine detection on real wrapped models
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
record["detect_ddp"] = detect(ddp, world_size=2).to_record()
record["detect_fsdp2_trainer"] = detect(model, world_size=2).to_record()
record["detect_fsdp2_trainer_line"] = detect(model, world_size=2).line()

# a real Trainer asked for FSDP2 on CPU: accelerate runs DDP; lossguard says so in one line
class Lines(logging.Handler):
    seen: list = []

    def emit(self, rec):
        Lines.seen.append(rec.getMessage())


logging.getLogger("lossguard").addHandler(Lines())
setup = tiny_setup(lora=False, n_train=32)
hf_guard = LossGuard(GuardConfig(console=False, probe={"enabled": False}))
trainer = make_trainer(setup, os.path.join(out, "trainer"), callbacks=[hf_guard], max_steps=2,
                       per_device_train_batch_size=4, ddp_backend="gloo", fsdp="full_shard",
                       fsdp_config={"fsdp_version": 2})
trainer.train()
record["trainer"] = {"fsdp_enabled": trainer.is_fsdp_enabled,
                     "distributed_type": str(trainer.accelerator.distributed_type.value),
                     "engine": hf_guard.engine_info.to_record(), "lines": [m for m in Lines.seen if "asked for" in m],
                     "recovery": hf_guard.recovery is not None and hf_guard.recovery.recoverer is not None}

with open(os.path.join(out, f"fsdp.rank{rank}.json"), "w") as fh:
    json.dump(record, fh)
dist.barrier()
dist.destroy_process_group()
