"""The timeline format: an exact round trip, missing fields kept as None, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lossguard.gpu.timeline import Timeline, TimelineError

DATA = Path(__file__).parent.parent / "data" / "gpu"


def test_timeline_round_trip_is_exact(tmp_path: Path) -> None:
    original = Timeline.load(DATA / "placement_two_gpus.json")
    path = tmp_path / "t.json"
    original.save(path)
    again = Timeline.load(path)
    assert again == original
    assert again.to_dict() == json.loads((DATA / "placement_two_gpus.json").read_text())
    assert len(again.samples) == 60 and [d.index for d in again.devices] == [0, 1]
    assert again.samples[0].processes[0].pid == 4242


def test_mig_fixture_keeps_unsupported_fields_as_none() -> None:
    t = Timeline.load(DATA / "mig_unsupported.json")
    assert t.devices[0].mig is True
    g = t.samples[0].gpus[0]
    assert g.util_gpu is None and g.util_mem is None
    assert g.memory_used_mib == 18230.0
    assert t.samples[0].processes == ()


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"version": 2, "devices": [], "samples": []}', "unsupported timeline version 2"),
        ('{"version": 1, "devices": []}', "'samples' must be a list"),
        ('{"version": 1, "interval_s": 0, "devices": [], "samples": []}', "interval_s=0 must be a positive number"),
        ('{"version": 1, "devices": [{"name": "x"}], "samples": []}', "missing field 'index'"),
        ('{"version": 1, "devices": [], "samples": [{"t": 1, "gpus": [{"index": 0, "util_gpu": "high"}]}]}',
         "expected a number or null, got 'high'"),
    ],
)
def test_bad_timeline_files_fail_with_one_line_naming_the_file(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TimelineError) as info:
        Timeline.load(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and problem in msg and "\n" not in msg


def test_timeline_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TimelineError, match="is a directory"):
        Timeline.load(tmp_path)
