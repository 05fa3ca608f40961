"""Real FSDP2 (``fully_shard``, gloo, 2 processes, CPU) in a hand-written loop with ``LoopGuard``:
a NaN in one rank's own shard; both ranks decide, roll back and resume in lockstep."""

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, torchrun):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(Path(__file__).with_name("fsdp_loop_script.py"), str(out))
    return out, [json.loads((out / f"fsdp.rank{r}.json").read_text()) for r in (0, 1)]


def test_recording_is_over_all_shards_and_all_ranks(ranks):
    out, (r0, r1) = ranks
    assert r0["world"] == r1["world"] == 2
    assert r0["engine"]["kind"] == "fsdp2" and r0["engine"]["recovery"]
    # the guard's gradient norm over the shards is the norm of the gathered gradients, on both ranks
    for r in (r0, r1):
        assert r["norms"]["guard"] == pytest.approx(r["norms"]["gathered"], rel=1e-5)
    assert r0["norms"]["guard"] == pytest.approx(r1["norms"]["guard"], rel=1e-6)
    samples = {e["step"]: e for e in map(json.loads, (out / "lossguard" / "events.jsonl").read_text().splitlines())
               if e["kind"] == "sample"}
    for step in ("3", "7"):  # the recorded loss is the mean of the ranks' own losses
        assert samples[int(step)]["loss"] == pytest.approx((r0["losses"][step] + r1["losses"][step]) / 2, rel=1e-5)
    assert samples[11]["loss"] == "nan"
    # the norm clip_grad_norm_ returned (a DTensor) is recorded as the norm of the gathered gradients
    assert samples[3]["grad_norm"] == pytest.approx(r0["norms"]["gathered"], rel=1e-5)


def test_nan_in_one_shard_both_ranks_roll_back_bitwise(ranks):
    _, (r0, r1) = ranks
    # rank 1's shard was NaN at step 10: neither rank kept that snapshot, so both hold the same targets
    assert r0["rings"] == r1["rings"]
    assert 10 not in r0["rings"]["10"] and r0["rings"]["10"] == [0, 2, 4, 6, 8]
    # the target came back from disk: each rank spilled its own shards (safetensors) into its own folder
    assert r0["on_disk"]["10"] == r1["on_disk"]["10"] == [0, 2, 4, 6]
    assert r0["spill_dir"].endswith("lossguard/snapshots") and r1["spill_dir"].endswith("lossguard/snapshots-rank1")
    for r in (r0, r1):
        assert (r["rollback"]["step"], r["rollback"]["to"]) == (11, 6)
        assert r["rollback"]["bitwise"]  # this rank's parameter and optimizer shards are the snapshot's
        assert r["rollback"]["checksum"] == r["snapshot_checksums"]["6"]
        assert r["final_finite"]
    assert r0["rollback"]["checksum"] == r1["rollback"]["checksum"]  # the gathered model, identical
    assert r0["final_checksum"] == r1["final_checksum"]
    assert r0["lr_used"]["3"] == r1["lr_used"]["3"]


def test_each_rank_snapshots_only_its_own_shard(ranks):
    _, (r0, r1) = ranks
    for r in (r0, r1):
        mem = r["memory"]
        assert mem["snapshot"] == mem["shard"]  # parameters and optimizer state of this rank's shard
        assert mem["snapshot"] < 0.6 * 3 * mem["whole_params"]  # a full copy would be ~3x the parameters
        # the cost model, measured at train begin (no optimizer state yet), predicts this rank's shard
        assert mem["predicted"] == pytest.approx(mem["snapshot"], rel=0.01)
    # the two shards add up to the whole model once (plus each rank's scalar step counters)
    counters = 2 * 4 * 21  # a float32 `step` per parameter per rank
    assert r0["memory"]["snapshot"] + r1["memory"]["snapshot"] - counters == 3 * r0["memory"]["whole_params"]


def test_lr_override_and_safety_net_verdict_in_lockstep(ranks):
    _, (r0, r1) = ranks
    restores = [a["step"] for a in r0["actions"] if a["action"] == "lr_restore"]
    assert len(restores) == 1
    for r in (r0, r1):
        for step in range(1, 25):
            s = str(step)
            factor = 0.1 if 11 < step <= restores[0] else 1.0
            assert r["lr_used"][s] == pytest.approx(factor * r["scheduled"][s], rel=1e-12), step
    # the abandoned head held a NaN shard: nothing to judge against, on both ranks alike
    assert "held-out loss is nan" in next(a for a in r0["actions"] if a["action"] == "rollback")["details"]["safety_net"]
    # a forced false alarm at step 10 (second guard): both ranks score their own batches, pool the
    # scores and reach one verdict at step 15
    for r in (r0, r1):
        for v in r["verdicts"]:
            v["details"].pop("restore_seconds")  # each rank's own time
    assert r0["verdicts"] == r1["verdicts"] and len(r0["verdicts"]) == 1
    verdict = r0["verdicts"][0]
    assert verdict["step"] == 15 and verdict["details"]["units"] == 8
    if verdict["action"] == "revert":  # the head put back: this rank's shards, bitwise
        for r in (r0, r1):
            assert r["after_revert"] == r["head_checksum"]


def test_a_rollback_the_held_out_loss_contradicts_is_declined_on_every_rank_and_changes_no_shard(ranks):
    _, (r0, r1) = ranks
    for r in (r0, r1):
        for a in r["precheck_actions"]:
            a["details"].pop("restore_seconds", None)
    assert r0["precheck_actions"] == r1["precheck_actions"]  # pooled scores: one decision
    decline, = r0["precheck_actions"]
    assert decline["action"] == "decline" and 12 <= decline["step"] < 20 and decline["to_step"] <= 3
    assert decline["details"]["units"] == 8 and decline["details"]["gain"] > decline["details"]["threshold"]
    for r in (r0, r1):  # each rank's shards put back, bitwise
        assert r["after_decline"] == r["before_decline"]


def test_fallback_checkpoint_is_dcp_and_resumes_bitwise(ranks):
    _, (r0, r1) = ranks
    saves = [a for a in r0["actions"] if a["action"] == "save"]
    assert saves[0]["from_step"] == 6 and saves[0]["details"]["format"] == "torch.distributed.checkpoint"
    path = Path(saves[0]["details"]["path"])
    assert path.name == "lossguard-fallback-11" and (path / ".metadata").is_file()
    assert (path / "lossguard_state.json").is_file() and (path / "lossguard_fallback.json").is_file()
    for r in (r0, r1):
        assert r["resumed"]["bitwise"] and r["resumed"]["trains"]
        assert r["resumed"]["global_step"] == 11


def test_probe_is_a_recorded_skip_on_every_rank(ranks):
    _, (r0, r1) = ranks
    assert r0["probe_record"] == r1["probe_record"]
    assert r0["probe_record"]["skipped"] and r0["probe_record"]["reason"] == "sharded"
    assert r0["probe_record"]["message"].startswith("probe skipped: parameters are sharded (FSDP2/DTensor)")
    assert r0["probe_direct"]["reason"] == "sharded"


def test_engine_detection_on_real_wrapped_models(ranks):
    _, (r0, _) = ranks
    assert r0["detect_ddp"]["kind"] == "ddp" and r0["detect_ddp"]["recovery"] and r0["detect_ddp"]["probe"]
    trainer = r0["detect_fsdp2_trainer"]
    assert trainer["kind"] == "fsdp2" and not trainer["recovery"] and not trainer["probe"]
    assert r0["detect_fsdp2_trainer_line"].count("\n") == 0
    assert "records and detects; recovery and the Hessian probe off" in r0["detect_fsdp2_trainer_line"]


def test_trainer_asked_for_fsdp_on_cpu_runs_ddp_and_lossguard_says_so(ranks):
    _, (r0, r1) = ranks
    for r in (r0, r1):
        t = r["trainer"]
        assert not t["fsdp_enabled"] and t["distributed_type"] == "MULTI_CPU"
        assert t["engine"]["kind"] == "ddp" and t["engine"]["requested"] and t["recovery"]
    assert r0["trainer"]["lines"] == ["lossguard: FSDP2 (TrainingArguments.fsdp) was asked for but accelerate's "
                                      "distributed_type is MULTI_CPU: DDP runs, the model is not sharded"]
    assert r1["trainer"]["lines"] == []  # rank 0 speaks for all
