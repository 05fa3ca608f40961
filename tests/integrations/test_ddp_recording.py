"""Real torch.distributed (gloo, 2 processes): one log, the same all-reduced loss on both ranks."""

import json
from pathlib import Path

import pytest

from lossguard.telemetry import read_events

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def test_two_ranks_one_log_identical_losses(tmp_path, torchrun):
    torchrun(Path(__file__).with_name("ddp_record_script.py"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"seen.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    seen0, seen1 = ranks[0]["seen"], ranks[1]["seen"]
    assert len(seen0) == len(seen1) == 5
    for a, b in zip(seen0, seen1):
        assert a["reduced"] == b["reduced"]  # every rank decides from the same number
        assert a["reduced"] == pytest.approx((a["local"] + b["local"]) / 2, rel=1e-9)
        assert a["tokens"] == b["tokens"]
    assert any(a["local"] != b["local"] for a, b in zip(seen0, seen1))  # ranks saw different data
    logs = list(tmp_path.glob("**/events.jsonl"))
    assert logs == [tmp_path / "lossguard" / "events.jsonl"]  # rank 0 alone writes
    samples = [r for r in read_events(logs[0]) if r["kind"] == "sample"]
    assert [r["loss"] for r in samples] == pytest.approx([s["reduced"] for s in seen0])
    run = next(r for r in read_events(logs[0]) if r["kind"] == "run")
    assert run["world_size"] == 2 and run["parallel_mode"] == "distributed"
    assert run["effective_batch_size"] == 8
