"""Real torch.distributed (gloo, 2 processes): a NaN on one rank only; both roll back in lockstep."""

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def test_nan_on_one_rank_every_rank_rolls_back_to_the_same_step(tmp_path, torchrun):
    torchrun(Path(__file__).with_name("ddp_recovery_script.py"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"recovery.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for r in ranks:
        rollbacks = [(a["from_step"], a["to_step"]) for a in r["actions"] if a["action"] == "rollback"]
        assert rollbacks == [(12, 5)]  # rank 0 saw no NaN itself, yet rolled back with rank 1
        assert any(a["action"] == "lr_restore" for a in r["actions"])
        assert r["final_step"] == 24 and r["finite"]  # nobody deadlocked, training ended finite
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the ranks' weights are still identical
    # the rollback came from disk, each rank from its own folder (one shared folder let them delete
    # each other's snapshots)
    assert ranks[0]["spill_dir"] == str(tmp_path / "lossguard" / "snapshots")
    assert ranks[1]["spill_dir"] == str(tmp_path / "lossguard" / "snapshots-rank1")
    assert ranks[0]["spilled"] == ranks[1]["spilled"] and ranks[0]["spilled"]
    # scratch: the stale snapshot of an earlier run went at the start, this run's at train end
    assert ranks[0]["left_on_disk"] == ranks[1]["left_on_disk"] == []
    events = [json.loads(line) for line in (tmp_path / "lossguard" / "events.jsonl").read_text().splitlines()]
    assert [e["to_step"] for e in events if e["kind"] == "action" and e["action"] == "rollback"] == [5]


def test_every_rank_takes_the_same_decision_on_pooled_scores(tmp_path, torchrun):
    torchrun(Path(__file__).with_name("ddp_safety_net_script.py"), str(tmp_path))
    # looking first: the head beats the snapshot before the forced spike, so every rank declines
    ranks = [json.loads((tmp_path / f"declined.rank{r}.json").read_text()) for r in (0, 1)]
    details = []
    for r in ranks:
        assert r["world"] == 2 and r["judge_rows"] == 16  # each rank scores its half of the 32 sequences
        kinds = [(a["action"], a["step"]) for a in r["actions"]]
        assert kinds == [("decline", 10)]
        decline = r["actions"][0]["details"]
        assert decline["check_step"] == 5 and decline["units"] == 16 and decline["gain"] > decline["threshold"]
        details.append({k: decline[k] for k in ("head_score", "check_score", "gain", "stderr")})
        assert r["head"] is None
        assert [f["severity"] for f in r["findings"] if f["message"].startswith("forced")] == ["info"]
        assert r["final_step"] == 24
    assert details[0] == details[1]
    # a declined rollback changes nothing: the run ends bitwise where it ends without the false alarm
    plain = [json.loads((tmp_path / f"plain.rank{r}.json").read_text()) for r in (0, 1)]
    assert [a["action"] for a in plain[0]["actions"]] == []
    assert ranks[0]["checksum"] == ranks[1]["checksum"] == plain[0]["checksum"] == plain[1]["checksum"]

    # not looking: the trial runs and is reverted, at the same step with the same scores on both ranks
    ranks = [json.loads((tmp_path / f"tried.rank{r}.json").read_text()) for r in (0, 1)]
    verdicts = []
    for r in ranks:
        rollback = [a for a in r["actions"] if a["action"] == "rollback"]
        revert = [a for a in r["actions"] if a["action"] == "revert"]
        assert [(a["step"], a["to_step"]) for a in rollback] == [(10, 5)]
        assert [(a["step"], a["to_step"]) for a in revert] == [(15, 10)]
        assert revert[0]["details"]["units"] == 16  # unit i pools sequence i of each rank
        verdicts.append({k: revert[0]["details"][k] for k in ("head_score", "branch_score", "gain", "stderr")})
        assert r["after_revert"] == r["head"]  # the head put back, bitwise
        assert r["final_step"] == 24
    assert verdicts[0] == verdicts[1]  # the same scores on both ranks
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
