"""The HTML report as text: self-contained, hostile strings escaped, big runs thinned with spikes kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lossguard.presentation.report import figures, render_html, safe_json
from lossguard.telemetry import EventWriter
from lossguard.watch.live import read_run

HOSTILE = '<img src=x onerror=alert(1)></script><script>alert(2)</script>&amp;'


def test_safe_json_cannot_close_a_script() -> None:
    text = safe_json({"m": HOSTILE, "x": float("nan"), "u": "\u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"m": HOSTILE, "x": None, "u": "\u2028"}


def _run(run_dir: Path, steps: int, spike_at: int) -> None:
    with EventWriter(run_dir / "lossguard" / "events.jsonl", clock=lambda: 1.0) as w:
        w.write("run", max_steps=steps, learning_rate=1e-3, note=HOSTILE)
        w.write_record({"kind": "preflight", "rows": [{"name": "effective batch", "value": "32", "status": "ok",
                                                       "advice": HOSTILE}]})
        for i in range(1, steps + 1):
            w.write("sample", step=i, loss=50.0 if i == spike_at else 2.0 + (i % 10) * 0.01, grad_norm=1.0, lr=1e-3)
        w.write_record({"kind": "finding", "reason": "spike", "severity": "warning", "step": spike_at + 1,
                        "onset_step": spike_at, "message": HOSTILE})
        w.write_record({"kind": "action", "action": "rollback", "step": spike_at + 1, "from_step": spike_at + 1,
                        "to_step": spike_at - 50, "message": HOSTILE})
        w.write_record({"kind": "action", "action": "lr_override", "step": spike_at + 1, "lr_factor": 0.1,
                        "message": "low"})
        w.write_record({"kind": "action", "action": "lr_restore", "step": spike_at + 200, "message": "back"})


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    _run(tmp_path, 500, 250)
    page = render_html(read_run(tmp_path), plotly_js="/* plotly */")
    # only our own script elements: the embedded library, JSON data blocks and the boot script
    opened = re.findall(r"<script[^>]*>", page)
    assert opened.count('<script type="text/javascript">') == 2
    assert all(re.fullmatch(r'<script type="application/json" id="(fig-data-\w+|lossguard-figures)">', s)
               for s in opened if s != '<script type="text/javascript">')
    assert "<img" not in page and "onerror=alert(1)></script>" not in page
    assert page.count("&lt;img src=x onerror=alert(1)&gt;&lt;/script&gt;") == 4  # finding, action, preflight, config
    assert "http://" not in page and "https://" not in page
    # the data blocks hold the hover text escaped twice over: html for plotly, unicode for the parser
    data = json.loads(re.search(r'id="fig-data-loss">(.*?)</script>', page).group(1))  # type: ignore[union-attr]
    hovers = [h for t in data["data"] for h in t.get("hovertext", [])]
    assert any("&lt;img src=x" in h for h in hovers)
    shapes = data["layout"]["shapes"]
    assert {"type": "rect", "x0": 251, "x1": 450}.items() <= next(s for s in shapes if s["type"] == "rect").items()
    assert any(s["type"] == "line" and s["x0"] == 200 for s in shapes)  # rollback target marked


def test_real_plotly_is_embedded(tmp_path: Path) -> None:
    _run(tmp_path, 50, 25)
    out = tmp_path / "r.html"
    from lossguard.cli.report import write_report

    path, size, live = write_report(str(tmp_path), str(out))
    assert path == out and size == out.stat().st_size
    text = out.read_text()
    assert size > 3_000_000 and "Plotly" in text and "cdn.plot.ly" not in text.split("</head>")[1]


def test_large_runs_are_thinned_but_spikes_stay(tmp_path: Path) -> None:
    _run(tmp_path, 10_000, 7_321)
    live = read_run(tmp_path)
    figs = dict(figures(live))
    raw = figs["loss"]["data"][0]
    assert len(raw["x"]) <= 4000
    assert max(raw["y"]) == 50.0 and raw["x"][raw["y"].index(50.0)] == 7_321
    assert min(raw["y"]) == 2.0
    assert "thinned to min/max per 8-sample bucket" in render_html(live, plotly_js="")


def test_summary_rounds_the_last_loss(tmp_path: Path) -> None:
    with EventWriter(tmp_path / "lossguard" / "events.jsonl", clock=lambda: 1.0) as w:
        w.write("run", max_steps=10)
        w.write("sample", step=1, loss=2.5, grad_norm=1.0, lr=1e-3)
        w.write("sample", step=2, loss=0.901636004447937, grad_norm=1.0, lr=1e-3)
    page = render_html(read_run(tmp_path), plotly_js="/* plotly */")
    assert "<td>last loss</td><td>0.9016</td>" in page


def test_verdicts_are_marked_and_counted(tmp_path: Path) -> None:
    _run(tmp_path, 500, 250)
    with EventWriter(tmp_path / "lossguard" / "events.jsonl", clock=lambda: 2.0) as w:
        w.write_record({"kind": "action", "action": "revert", "step": 301, "from_step": 301, "to_step": 251,
                        "reason": "spike", "message": "reverted: no better", "details": {"false_alarm": "spike"}})
    page = render_html(read_run(tmp_path), plotly_js="/* plotly */")
    assert "<td>verdicts on rollbacks</td><td>kept 0, reverted 1</td>" in page
    data = json.loads(re.search(r'id="fig-data-loss">(.*?)</script>', page).group(1))  # type: ignore[union-attr]
    trace = next(t for t in data["data"] if t.get("name") == "rollback reverted (1)")  # kept ones: their own entry
    assert trace["x"] == [301] and trace["marker"]["symbol"] == "x"
    assert "revert. reverted: no better" in trace["hovertext"][0]
