"""The live dashboard rendered into a fixed-width StringIO console and read as text."""

from __future__ import annotations

import io
import math
from pathlib import Path

from rich.console import Console

from lossguard.presentation.dashboard import line_chart, recovery_state, render, sparkline
from lossguard.telemetry import EventWriter
from lossguard.watch.downsample import MinMaxBuckets
from lossguard.watch.live import read_run


def _text(renderable, width: int = 100) -> str:  # type: ignore[no-untyped-def]
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, legacy_windows=False).print(renderable)
    return buf.getvalue()


def _series(values: list[float]) -> MinMaxBuckets:
    b = MinMaxBuckets(100)
    for i, v in enumerate(values, start=1):
        b.add(i, v)
    return b


def test_sparkline_maps_values_to_blocks() -> None:
    assert str(sparkline(_series([1, 2, 3, 4, 5, 6, 7, 8]), 8)) == "▁▂▃▄▅▆▇█"
    assert str(sparkline(MinMaxBuckets(10), 8)) == "-"


def test_line_chart_draws_band_and_labels() -> None:
    chart = str(line_chart(_series([0.0, 0.0, 0.0, 10.0]), None, width=12, height=2))
    rows = chart.split("\n")
    # flat at 0 (bottom dots), then the jump to 10 drawn as a full-height line in the last column
    assert rows[0] == "       10┤   ⢸"
    assert rows[1] == "        0┤⡀⡀⢀⢸"
    assert rows[2].split() == ["step", "1", "step", "4"]



def test_values_near_the_float_limit_still_draw() -> None:
    # a damaged log: 1e308 next to -1e308 overflows the axis span to inf (int(nan) raised)
    values = [1.0, 1e308, -1e308, 2.0, 1.5]
    assert len(str(sparkline(_series(values), 5))) == 5
    rows = str(line_chart(_series(values), _series(values), width=12, height=3)).split("\n")
    assert len(rows) == 4 and rows[3].split() == ["step", "1", "step", "5"]

def _run(run_dir: Path) -> None:
    with EventWriter(run_dir / "lossguard" / "events.jsonl", clock=lambda: 1000.0) as w:
        w.write("run", max_steps=400, num_train_epochs=1.0)
        for i in range(1, 201):
            w.write("sample", step=i, loss=3.0 - i / 100, grad_norm=1.0, lr=1e-3, step_time_s=0.5, t=1000.0 + i)
        w.write_record({"kind": "finding", "reason": "spike", "severity": "warning", "step": 120, "onset_step": 118,
                        "message": "loss [bold]7.9[/bold] > 3.1 <script>"})
        w.write_record({"kind": "action", "action": "rollback", "step": 121, "from_step": 121, "to_step": 100,
                        "message": "rolled back to step 100"})
        w.write_record({"kind": "action", "action": "lr_override", "step": 121, "lr_factor": 0.1,
                        "message": "LR x0.1 until the loss recovers"})
        w.write_record({"kind": "probe", "step": 150, "lambda_max": 12.5, "lambda_min": -0.9, "ratio": -0.072,
                        "verdict": "saddle"})
        w.write_record({"kind": "gpu", "step": 200, "gpus": [
            {"index": 0, "util_mean": 90, "util_p5": 70, "util_p95": 99, "memory_used_mib": 30720,
             "memory_total_mib": 81920, "power_w": 350},
            {"index": 1, "util_mean": "garbage"}, "not a dict"]})


def test_dashboard_text(tmp_path: Path) -> None:
    _run(tmp_path)
    live = read_run(tmp_path)
    live.run_dir = Path("runs/qwen-it")  # as typed by the user: keeps the header on one line
    out = _text(render(live, width=100, now=live.updated_at + 65))
    lines = out.splitlines()
    # the spike was rolled back to before its onset: handled
    assert lines[0] == "lossguard watch runs/qwen-it  source lossguard  status RECOVERED  updated 0:01:05 ago"
    assert lines.pop(1) == "handled: spike at 120"
    assert lines[1].startswith("step 200/400 ████████████████████░░░░░░░░░░░░░░░░░░░░  50.0%")
    assert lines[1].endswith("0.5 s/step  ETA 0:01:40")
    assert "│ loss 1  smoothed 1.095  grad norm 1  lr 0.001" in out
    assert "│ LOW LR x0.1 since step 121   rollbacks 1" in out
    assert "step 150: λmax 12.5  λmin -0.9  ratio -0.072" in out and "│ → saddle" in out
    assert "│ GPU0  ███████████████████████████░░░   90%  p5 70 p95 99  mem 30.0/80.0 GiB  350 W" in out
    assert "│ GPU1  ??????????????????????????????    -%" in out
    # markup-looking text from the log is printed literally
    assert "│ warning step 120 spike loss [bold]7.9[/bold] > 3.1 <script>" in out
    assert "findings (1)" in out


def test_dashboard_nonfinite_and_waiting(tmp_path: Path) -> None:
    with EventWriter(tmp_path / "lossguard" / "events.jsonl") as w:
        for i in range(1, 30):
            w.write("sample", step=i, loss=math.nan if i == 25 else 2.0)
    live = read_run(tmp_path)
    out = _text(render(live, width=90, now=live.updated_at))
    assert "non-finite loss at 1 step(s), first at step 25" in out
    assert "step 29 (max_steps unknown)" in out
    assert "status CRITICAL" in out
    live.clear()
    live.waiting = "waiting for training to start: no log in X yet"
    out = _text(render(live, width=90, now=0))
    assert "waiting for training to start: no log in X yet" in out


def _judged_run(run_dir: Path, verdict: str | None) -> None:
    """A spike rolled back at step 121 and put on trial; ``verdict`` (keep / revert) at step 142, or none yet."""
    with EventWriter(run_dir / "lossguard" / "events.jsonl", clock=lambda: 1000.0) as w:
        w.write("run", max_steps=400)
        for i in range(1, 161 if verdict else 131):
            w.write("sample", step=i, loss=2.0, grad_norm=1.0, lr=1e-3, step_time_s=0.5, t=1000.0 + i)
        w.write_record({"kind": "action", "action": "rollback", "step": 121, "from_step": 121, "to_step": 100,
                        "reason": "spike", "message": "rolled back", "details": {"verdict_step": 142}})
        w.write_record({"kind": "action", "action": "lr_override", "step": 121, "lr_factor": 0.1, "message": "low"})
        if verdict:
            w.write_record({"kind": "action", "action": verdict, "step": 142, "from_step": 142, "to_step": 121,
                            "reason": "spike", "message": f"{verdict}: head 1.02, branch 1.1",
                            "details": {"head_score": 1.02, "branch_score": 1.1, "head_step": 121,
                                        "false_alarm": "spike" if verdict == "revert" else None}})


def test_dashboard_shows_the_safety_nets_verdicts(tmp_path: Path) -> None:
    _judged_run(tmp_path / "pending", None)
    out = _text(recovery_state(read_run(tmp_path / "pending")))
    assert "LOW LR x0.1 since step 121   rollbacks 1  verdict due at step 142" in out
    _judged_run(tmp_path / "reverted", "revert")
    live = read_run(tmp_path / "reverted")
    out = _text(recovery_state(live))
    assert "NORMAL (reverted to the head of step 121 at step 142)   rollbacks 1  kept 0  reverted 1" in out
    assert "verdict due" not in out and "step 142 revert: revert: head 1.02, branch 1.1" in out
    assert live.lr_phases() == [(121, 142, 0.1)]  # the revert ended the reduced LR
    _judged_run(tmp_path / "kept", "keep")
    out = _text(recovery_state(read_run(tmp_path / "kept")))
    assert "rollbacks 1  kept 1  reverted 0" in out and "LOW LR" in out and "verdict due" not in out
