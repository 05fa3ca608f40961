"""Snapshots of a real peft LoRA model and AdamW: content, memory cap, atomic safetensors spill."""

import numpy as np
import pytest
import torch

from lossguard.recovery.snapshot import (
    SnapshotRing,
    capture,
    load_snapshot,
    save_snapshot,
    trainable_parameters,
)
from lossguard.testing.tiny import tiny_setup


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    setup = tiny_setup(n_train=64)
    model = setup.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / 100)
    batch = setup.collator(setup.train[:8])
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _equal_trees(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_trees(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_trees(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def test_capture_holds_lora_params_optimizer_scheduler_rng_and_engine(trained):
    model, opt, sched = trained
    snap = capture(3, model, opt, sched, engine={"plateau": {"n": 3}})
    params = trainable_parameters(model)
    assert set(snap.params) == set(params) and all("lora_" in n for n in params)
    assert all(torch.equal(snap.params[n], p.detach()) for n, p in params.items())
    assert snap.params[next(iter(params))].data_ptr() != next(iter(params.values())).data_ptr()
    assert _equal_trees(snap.optimizer["state"], opt.state_dict()["state"])
    assert snap.scheduler["last_epoch"] == 3 and snap.engine == {"plateau": {"n": 3}}
    assert set(snap.rng) >= {"python", "numpy", "torch"}
    n_params = sum(p.numel() for p in params.values())
    assert snap.nbytes == n_params * 4 * 3 + 4 * len(params)  # params + 2 Adam moments + step counters


def test_safetensors_round_trip_is_bitwise_and_atomic(trained, tmp_path):
    model, opt, sched = trained
    snap = capture(7, model, opt, sched, engine={"x": [1.5, 2.5]})
    path = save_snapshot(snap, tmp_path)
    assert path.name == "step-000000007" and (path / "tensors.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp folder left behind
    back = load_snapshot(path)
    assert back.step == 7 and back.engine == {"x": [1.5, 2.5]}
    assert _equal_trees(back.params, snap.params) and _equal_trees(back.optimizer, snap.optimizer)
    assert back.scheduler == snap.scheduler
    assert torch.equal(back.rng["torch"], snap.rng["torch"]) and back.rng["python"] == snap.rng["python"]


def test_memory_cap_spills_oldest_to_disk_and_keeps_the_first(trained, tmp_path):
    model, opt, sched = trained
    one = capture(0, model, opt, sched).nbytes
    ring = SnapshotRing(memory_mb=2.5 * one / 2**20, spill_dir=tmp_path, disk_keep=3)
    for step in range(0, 250, 25):
        ring.add(capture(step, model, opt, sched))
    summary = ring.state_summary()
    assert summary["memory"] == [200, 225] and summary["memory_bytes"] <= 2.5 * one
    assert summary["disk"] == [0, 150, 175]  # disk_keep=3: the first is kept, the middle thinned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000000", "step-000000150", "step-000000175"]
    got = ring.get(0)
    assert got.step == 0 and _equal_trees(got.params, capture(0, model, opt, sched).params)
    ring.drop_after(160)
    assert ring.steps() == (0, 150) and sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000000000", "step-000000150"]


def test_without_a_spill_dir_the_oldest_but_first_are_dropped(trained):
    model, opt, sched = trained
    one = capture(0, model, opt, sched).nbytes
    ring = SnapshotRing(memory_mb=3.5 * one / 2**20)
    for step in range(0, 200, 25):
        ring.add(capture(step, model, opt, sched))
    assert ring.steps() == (0, 150, 175)


def test_capturer_follows_replaced_optimizer_state_and_never_aliases(trained):
    from lossguard.recovery.snapshot import Capturer

    model, opt, sched = trained
    cap = Capturer(model, opt)
    first = cap.capture(1, sched)
    before = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()}
    opt.load_state_dict(opt.state_dict())  # new state tensors: the cached layout must be found again
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(1.0)
        for st in opt.state.values():
            st["exp_avg"].add_(1.0)
    second = cap.capture(2, sched)
    assert _equal_trees(first.optimizer["state"], before)  # later training never reaches an old snapshot
    assert _equal_trees(second.optimizer["state"], opt.state_dict()["state"])
    assert all(torch.equal(second.params[n], p.detach()) for n, p in trainable_parameters(model).items())
    assert not any(torch.equal(first.params[n], p.detach()) for n, p in trainable_parameters(model).items())
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.sub_(1.0)
        for st in opt.state.values():
            st["exp_avg"].sub_(1.0)


def test_capturer_refuses_a_non_finite_state_and_freezes_engine_state(trained):
    from lossguard.recovery.snapshot import Capturer

    model, opt, sched = trained
    cap = Capturer(model, opt)
    engine = {"spike": {"values": [1.0, float("nan")]}}
    snap = cap.capture(3, sched, engine)
    engine["spike"]["values"].append(9.0)  # the detectors move on; the snapshot keeps its copy
    got = snap.engine
    assert got["spike"]["values"][0] == 1.0 and len(got["spike"]["values"]) == 2
    got["spike"]["values"].clear()
    assert len(snap.engine["spike"]["values"]) == 2  # each read is a fresh copy
    p = next(iter(trainable_parameters(model).values()))
    keep = p.detach().clone()
    with torch.no_grad():
        p.view(-1)[0] = float("inf")
    try:
        assert cap.capture(4, sched, require_finite=True) is None
        assert cap.capture(4, sched) is not None
    finally:
        with torch.no_grad():
            p.copy_(keep)
    assert cap.capture(5, sched, require_finite=True) is not None


def test_spilled_snapshots_are_scratch_of_one_run(trained, tmp_path, caplog):
    from lossguard.config import RecoveryConfig
    from lossguard.recovery.apply import Recoverer

    model, opt, sched = trained
    spill = tmp_path / "snapshots"
    # what an earlier run that crashed left: two snapshots and a half-written one; and a user's file
    for name in ("step-000000100", "step-000000150", ".tmp-step-000000200-4242"):
        (spill / name).mkdir(parents=True)
        (spill / name / "meta.json").write_text("{}")
    (spill / "notes.txt").write_text("mine")
    (spill / "step-final").mkdir()  # not a name lossguard writes
    one = capture(0, model, opt, sched).nbytes
    with caplog.at_level("INFO", logger="lossguard"):
        rec = Recoverer(model, opt, sched, config=RecoveryConfig(snapshot_memory_mb=1.5 * one / 2**20),
                        spill_dir=spill)
    assert "removed 3 snapshot(s) an earlier run left" in caplog.text
    assert sorted(p.name for p in spill.iterdir()) == ["notes.txt", "step-final"]
    for step in (0, 50, 100):
        rec.snapshot(step)
    assert rec.ring.state_summary()["disk"] == [0, 50]
    assert sorted(p.name for p in spill.iterdir()) == ["notes.txt", "step-000000000", "step-000000050", "step-final"]
    rec.close()  # train end
    assert sorted(p.name for p in spill.iterdir()) == ["notes.txt", "step-final"] and len(rec.ring) == 0
