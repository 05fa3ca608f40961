"""The report reads without decoding: whole words in cells, from/to in words, a legend for every
marker, every probe group on the Hessian chart, and an inconclusive verdict explained."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

from rich.console import Console

from lossguard.presentation.probe_text import probe_view
from lossguard.presentation.report import figures, render_html
from lossguard.records import Action, ActionKind, Finding, Reason, Severity
from lossguard.telemetry import EventWriter
from lossguard.watch.live import read_run

WHY = "inconclusive: the probe batches disagree (minimum at r 0.000, saddle at r -0.190); 60 products in 9.1 s"


def _demo_like(run: Path) -> None:
    """What the demo records: a plateau rolled back, a probe whose two groups disagree, a relapse
    rolled back, a kept recovery and a reverted one, and the pinned checkpoint."""
    with EventWriter(run / "lossguard" / "events.jsonl", clock=lambda: 1.0) as w:
        w.write("run", max_steps=600)
        for i in range(1, 601):
            w.write("sample", step=i, loss=1.0 + 2.0 * math.exp(-i / 100), grad_norm=1.0, lr=3e-2)
        w.write_record(Finding(Reason.EARLY_CONVERGENCE, Severity.WARNING, 101, 11, "plateau",
                               detector="plateau").to_record())
        w.write("probe", step=110, verdict="inconclusive", ratio=0.000126, lambda_max=9.1, lambda_min=0.00115,
                message=WHY, groups=[{"verdict": "minimum", "ratio": 0.000126, "lambda_max": 9.1, "lambda_min": 0.00115},
                                     {"verdict": "saddle", "ratio": -0.19, "lambda_max": 8.7, "lambda_min": -1.65}])
        for a in (Action(ActionKind.ROLLBACK, 110, "rolled back", from_step=110, to_step=0),
                  Action(ActionKind.LR_OVERRIDE, 110, "lr x0.1", from_step=110, to_step=410, lr_factor=0.1),
                  Action(ActionKind.SAVE, 110, "kept", from_step=0, to_step=110),
                  Action(ActionKind.LR_RESTORE, 220, "lr back", from_step=101, to_step=220, lr_factor=1.0),
                  Action(ActionKind.KEEP, 220, "kept the recovery", from_step=110, to_step=0),
                  Action(ActionKind.ROLLBACK, 300, "relapse rollback", from_step=300, to_step=250),
                  Action(ActionKind.REVERT, 400, "reverted", from_step=400, to_step=300)):
            w.write_record(a.to_record())


def test_every_marker_kind_has_a_legend_entry(tmp_path):
    _demo_like(tmp_path)
    loss = dict(figures(read_run(tmp_path)))["loss"]
    shown = [t for t in loss["data"] if t.get("showlegend", True)]
    names = [t["name"] for t in shown]
    assert {"rollbacks (2)", "recovery kept (1)", "rollback reverted (1)", "reduced-LR phases (1)",
            "rollback target (state restored)", "warning findings (1)"} <= set(names)
    # a marker trace without its own entry belongs to a group that has one
    groups = {t.get("legendgroup") for t in shown}
    assert all(t.get("legendgroup") in groups for t in loss["data"] if not t.get("showlegend", True))
    # one symbol per legend entry
    assert all(isinstance(t.get("marker", {}).get("symbol", "circle"), str) for t in shown)


def test_the_hessian_chart_shows_every_batch_group_on_whole_step_ticks(tmp_path):
    _demo_like(tmp_path)
    probe = dict(figures(read_run(tmp_path)))["probes"]
    assert probe["layout"]["xaxis"]["type"] == "category"
    got = {t["name"]: (t["x"], t["y"]) for t in probe["data"]}
    assert got == {"λ max (group 1)": (["step 110"], [9.1]), "λ min (group 1)": (["step 110"], [0.00115]),
                   "λ max (group 2)": (["step 110"], [8.7]), "λ min (group 2)": (["step 110"], [-1.65])}


def test_tables_keep_words_whole_and_say_what_from_and_to_mean(tmp_path):
    _demo_like(tmp_path)
    page = render_html(read_run(tmp_path), plotly_js="", now=0.0)
    css = page[page.index("<style>"):page.index("</style>")]
    assert "word-break:break-word" not in css and "overflow-wrap:break-word" in css and "td.num{white-space:nowrap}" in css
    assert '<td class="num">410</td>' not in page  # the LR override's end is said in words, not a bare "to"
    actions = page[page.index('<table class="actions">'):]
    actions = actions[:actions.index("</table>")]
    assert "<th>steps involved</th>" in actions and "<th>from</th>" not in actions
    cells = re.findall(r"<td>([^<]*)</td>", actions)
    for expected in ("state of step 0 restored (left step 110)", "reduced LR from step 110, at most until step 410",
                     "checkpoint of step 110 (after the rollback to step 0)",
                     "reduced LR ended: detected at step 101, restored at step 220",
                     "judged: the head at step 110 against the branch restarted from step 0",
                     "back to the abandoned head, the state of step 300"):
        assert expected in cells, expected
    assert '<td class="num">110</td>' in actions  # numbers never wrap


def test_an_inconclusive_probe_is_explained_where_it_is_read(tmp_path):
    _demo_like(tmp_path)
    live = read_run(tmp_path)
    page = render_html(live, plotly_js="", now=0.0)
    table = page[page.index('<table class="probes">'):]
    assert ("inconclusive: group 1 minimum (lambda_min/lambda_max 0.000126); group 2 saddle (lambda_min/lambda_max "
            "-0.19). The probe batches disagree, so no verdict stands (every group must agree)") in table
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(probe_view(live))
    assert "group 2 saddle (lambda_min/lambda_max -0.19)" in buf.getvalue()


def test_reports_can_share_one_copy_of_plotly_instead_of_inlining_it(tmp_path):
    from typer.testing import CliRunner

    from lossguard.cli import _register, app

    _register()
    _demo_like(tmp_path / "run")
    out = tmp_path / "reports"
    r = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "-o", str(out / "a.html"), "--shared-plotly"])
    assert r.exit_code == 0, r.output
    (js,) = out.glob("plotly-*.min.js")
    stamp = js.stat().st_mtime_ns
    assert js.stat().st_size > 1_000_000
    r = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "-o", str(out / "b.html"), "--shared-plotly"])
    assert r.exit_code == 0 and js.stat().st_mtime_ns == stamp  # written once, then shared
    for page in ("a.html", "b.html"):
        text = (out / page).read_text()
        assert f'<script type="text/javascript" src="{js.name}"></script>' in text
        assert (out / page).stat().st_size < 200_000
    inline = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "-o", str(out / "c.html")])
    assert inline.exit_code == 0 and (out / "c.html").stat().st_size > 1_000_000  # the default stays self-contained
