"""The HTML report of ``lossguard report``: one self-contained file that opens offline.

plotly.js is embedded (no CDN), the curves come thinned with min/max buckets so spikes stay
visible, and everything read from the log is treated as hostile text: table cells go through
``html.escape``, figure data is embedded as JSON with ``<``, ``>`` and ``&`` written as unicode
escapes inside ``<script type="application/json">`` blocks, and plotly hover text is escaped so
plotly shows tags as characters instead of interpreting them.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from typing import TYPE_CHECKING, Any

from lossguard.numbers import as_float
from lossguard.presentation.probe_text import probe_explanation, probe_groups
from lossguard.records import Action, ActionKind, Severity
from lossguard.watch.downsample import MinMaxBuckets

if TYPE_CHECKING:
    from lossguard.watch.live import LiveRun

_SEVERITY_COLOR = {Severity.INFO: "#1f77b4", Severity.WARNING: "#e6a100", Severity.CRITICAL: "#d62728"}
_SCRIPT_CLOSE = re.compile(r"</(script)", re.IGNORECASE)


def _finite_only(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_only(v) for v in value]
    return value


def safe_json(value: Any) -> str:
    """JSON that can sit inside a ``<script>`` element whatever strings it carries (NaN -> null)."""
    text = json.dumps(_finite_only(value), allow_nan=False, separators=(",", ":"), default=str)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _clean(v: float | None) -> float | None:
    return as_float(v, finite=True)


def _line(series: MinMaxBuckets, name: str, color: str, width: float = 1.0, **extra: Any) -> dict[str, Any]:
    xs, ys = series.points()
    mode = "lines" if len(xs) > 60 else "lines+markers"
    return {"type": "scattergl" if len(xs) > 5000 else "scatter", "mode": mode, "name": name,
            "x": xs, "y": ys, "line": {"color": color, "width": width}, **extra}


def _hover(text: str, limit: int = 300) -> str:
    short = text if len(text) <= limit else text[: limit - 1] + "…"
    return html.escape(short)


def _loss_figure(live: LiveRun) -> dict[str, Any]:
    data: list[dict[str, Any]] = [
        _line(live.loss, "loss (min/max per bucket)", "rgba(31,119,180,0.55)"),
        _line(live.loss_smooth, "loss smoothed", "#08306b", 2.0),
    ]
    evals = [(as_float(e.get("step")), as_float(e.get("eval_loss"))) for e in live.evals]
    evals = [(x, y) for x, y in evals if _clean(x) is not None and _clean(y) is not None]
    if evals:
        data.append({"type": "scatter", "mode": "markers+lines", "name": "eval loss",
                     "x": [x for x, _ in evals], "y": [y for _, y in evals],
                     "marker": {"color": "#2ca02c", "size": 6}, "line": {"dash": "dot", "color": "#2ca02c"}})
    if live.loss.nonfinite:
        data.append({"type": "scatter", "mode": "markers", "name": f"non-finite loss ({live.loss.nonfinite_count})",
                     "x": live.loss.nonfinite, "y": [1.0] * len(live.loss.nonfinite), "yaxis": "y2",
                     "marker": {"symbol": "x", "color": "#d62728", "size": 9}})
    shapes: list[dict[str, Any]] = []
    for sev in (Severity.INFO, Severity.WARNING, Severity.CRITICAL):
        fs = [f for f in live.findings if f.severity == sev]
        if not fs:
            continue
        data.append({
            "type": "scatter", "mode": "markers", "name": f"{sev.value} findings ({len(fs)})",
            "x": [f.step for f in fs], "y": [0.97] * len(fs), "yaxis": "y2",
            "marker": {"symbol": "triangle-down", "size": 11, "color": _SEVERITY_COLOR[sev]},
            "hovertext": [_hover(f"step {f.step} (onset {f.onset_step}) {f.reason.value}: {f.message}") for f in fs],
            "hoverinfo": "text",
        })
        for f in fs[:200]:
            shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": f.step, "x1": f.step, "y0": 0,
                           "y1": 1, "line": {"color": _SEVERITY_COLOR[sev], "width": 1, "dash": "dot"}})
    rollbacks = [a for a in live.actions if a.action is ActionKind.ROLLBACK]
    if rollbacks:
        data.append({
            "type": "scatter", "mode": "markers", "name": f"rollbacks ({len(rollbacks)})",
            "x": [a.step for a in rollbacks], "y": [0.9] * len(rollbacks), "yaxis": "y2",
            "marker": {"symbol": "arrow-left", "size": 12, "color": "#9467bd"},
            "hovertext": [_hover(f"step {a.step}: rollback to step {a.to_step}. {a.message}") for a in rollbacks],
            "hoverinfo": "text",
        })
        for a in rollbacks[:200]:
            if a.to_step is not None:
                shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": a.to_step, "x1": a.to_step,
                               "y0": 0, "y1": 1, "line": {"color": "#9467bd", "width": 1.5}})
    for kind, label, symbol, color in ((ActionKind.KEEP, "recovery kept", "circle", "#2ca02c"),
                                       (ActionKind.REVERT, "rollback reverted", "x", "#ff7f0e"),
                                       (ActionKind.DECLINE, "rollback declined", "diamond-open", "#7f7f7f")):
        verdicts = [a for a in live.actions if a.action is kind]
        if verdicts:
            data.append({
                "type": "scatter", "mode": "markers", "name": f"{label} ({len(verdicts)})",
                "x": [a.step for a in verdicts], "y": [0.83] * len(verdicts), "yaxis": "y2",
                "marker": {"symbol": symbol, "size": 11, "color": color},
                "hovertext": [_hover(f"step {a.step}: {a.action.value}. {a.message}") for a in verdicts],
                "hoverinfo": "text",
            })
    if rollbacks:  # the solid line at each rollback's target: a legend entry of its own, drawing nothing
        data.append({"type": "scatter", "mode": "lines", "name": "rollback target (state restored)",
                     "x": [None], "y": [None], "line": {"color": "#9467bd", "width": 1.5}, "hoverinfo": "skip"})
    last_x = live.loss.last[0] if live.loss.last else None
    phases = live.lr_phases()[:200]
    for i, (start, end, factor) in enumerate(phases):
        stop = end if end is not None else last_x
        if stop is None:
            continue
        shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": start, "x1": stop, "y0": 0, "y1": 1,
                       "fillcolor": "rgba(255,165,0,0.12)", "line": {"width": 0}, "layer": "below"})
        data.append({"type": "scatter", "mode": "markers", "name": f"reduced-LR phases ({len(phases)})",
                     "legendgroup": "lr-phase", "showlegend": i == 0, "x": [start], "y": [0.05],
                     "yaxis": "y2", "marker": {"symbol": "square", "color": "orange", "size": 7},
                     "hovertext": [f"LR x{factor if factor is not None else '?'} from step {start} to {stop}"],
                     "hoverinfo": "text"})
    layout = {
        "title": {"text": "Training loss"}, "height": 420, "margin": {"t": 50, "b": 40},
        "xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": "loss"}},
        "yaxis2": {"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True},
        "shapes": shapes, "legend": {"orientation": "h", "y": -0.2},
    }
    return {"data": data, "layout": layout}


def _simple_figure(title: str, traces: list[dict[str, Any]], ytitle: str, *, log_y: bool = False) -> dict[str, Any]:
    return {"data": traces, "layout": {
        "title": {"text": title}, "height": 300, "margin": {"t": 50, "b": 40},
        "xaxis": {"title": {"text": "step"}},
        "yaxis": {"title": {"text": ytitle}, "type": "log" if log_y else "linear"},
        "legend": {"orientation": "h", "y": -0.3}}}


def _probe_figure(live: LiveRun) -> dict[str, Any] | None:
    pts: list[tuple[str, int, dict[str, Any], dict[str, Any]]] = []
    for p in live.probes:
        step = _clean(as_float(p.get("step")))
        if step is None or p.get("skipped"):
            continue
        for i, g in enumerate(probe_groups(p)):
            pts.append((f"step {int(step)}", i, g, p))
    if not pts:
        return None
    traces = []
    n_groups = max(i for _, i, _, _ in pts) + 1
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for i in range(n_groups):
        mine = [(x, g, p) for x, gi, g, p in pts if gi == i]
        suffix = f" (group {i + 1})" if n_groups > 1 else ""
        hover = [_hover(f"{x}{suffix}: {g.get('verdict')} at lambda_min/lambda_max {g.get('ratio')}; "
                        f"the probe's verdict: {probe_explanation(p)}") for x, g, p in mine]
        for key, label, dash in (("lambda_max", "λ max", "solid"), ("lambda_min", "λ min", "dot")):
            traces.append({"type": "scatter", "mode": "markers+lines", "name": f"{label}{suffix}",
                           "x": [x for x, _, _ in mine], "y": [_clean(as_float(g.get(key))) for _, g, _ in mine],
                           "hovertext": hover, "hoverinfo": "text",
                           "marker": {"color": colors[i % len(colors)], "size": 9,
                                      "symbol": "circle" if key == "lambda_max" else "diamond"},
                           "line": {"color": colors[i % len(colors)], "dash": dash}})
    fig = _simple_figure("Hessian probes (extreme eigenvalues per batch group)", traces, "eigenvalue")
    fig["layout"]["xaxis"] = {"title": {"text": "probe"}, "type": "category"}  # one tick per probe, no 109.5
    return fig


def figures(live: LiveRun) -> list[tuple[str, dict[str, Any]]]:
    """(id, plotly figure as plain data) for every panel the run has data for."""
    out = [("loss", _loss_figure(live))]
    if live.grad_norm.count:
        out.append(("grad_norm", _simple_figure("Gradient norm (before clipping)",
                                                [_line(live.grad_norm, "grad norm", "#ff7f0e")], "grad norm",
                                                log_y=True)))
    if live.lr.count:
        out.append(("lr", _simple_figure("Learning rate", [_line(live.lr, "lr", "#2ca02c")], "lr")))
    probe = _probe_figure(live)
    if probe is not None:
        out.append(("probes", probe))
    if live.gpu_util:
        traces = [_line(b, f"GPU {i}", color) for (i, b), color in zip(
            sorted(live.gpu_util.items()),
            ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"] * 64,
            strict=False)]
        fig = _simple_figure("GPU utilization (share of time a kernel ran)", traces, "util %")
        fig["layout"]["yaxis"]["range"] = [0, 105]
        out.append(("gpu", fig))
    return out


def action_steps(a: Action) -> str:
    """What an action's from/to steps mean, in words: they differ by kind (a state jump, a span of
    steps, two compared branches), so the report says which."""
    f, t = a.from_step, a.to_step
    kind = a.action
    if kind is ActionKind.ROLLBACK and t is not None:
        return f"state of step {t} restored (left step {f if f is not None else a.step})"
    if kind is ActionKind.REVERT and t is not None:
        return f"back to the abandoned head, the state of step {t}"
    if kind is ActionKind.DECLINE and f is not None and t is not None:
        return f"compared before rolling back: the head at step {f} against the snapshot of step {t}"
    if kind is ActionKind.KEEP and f is not None and t is not None:
        return f"judged: the head at step {f} against the branch restarted from step {t}"
    if kind is ActionKind.LR_OVERRIDE:
        return f"reduced LR from step {f if f is not None else a.step}" + (f", at most until step {t}" if t is not None
                                                                           else " on")
    if kind is ActionKind.LR_RESTORE and f is not None:
        return f"reduced LR ended: detected at step {f}, restored at step {t if t is not None else a.step}"
    if kind is ActionKind.SAVE and t is not None:
        return f"checkpoint of step {t}" + (f" (after the rollback to step {f})" if f is not None else "")
    return ""


def _table(headers: list[str] | None, rows: list[list[Any]], cls: str = "") -> str:
    if headers is None:
        head = ""
    else:
        head = "<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in headers) + "</tr></thead>"
    body = "".join(
        "<tr>" + "".join(f"<td class=\"num\">{c}</td>" if isinstance(c, (int, float)) and not isinstance(c, bool)
                         else f"<td>{html.escape('' if c is None else str(c))}</td>" for c in row) + "</tr>"
        for row in rows)
    return f'<table class="{html.escape(cls)}">{head}<tbody>{body}</tbody></table>'


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out.extend(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list):
        return [(prefix.rstrip("."), json.dumps(value, default=str)[:500])]
    return [(prefix.rstrip("."), value)]


def _config_rows(run: dict[str, Any] | None) -> list[list[Any]]:
    if not run:
        return []
    skip = {"v", "kind", "t"}
    return [[k, v] for k, v in _flat({k: v for k, v in run.items() if k not in skip})]


def _preflight_rows(pre: dict[str, Any] | None) -> list[list[Any]]:
    rows = pre.get("rows") if isinstance(pre, dict) else None
    if not isinstance(rows, list):
        return []
    out = []
    for r in rows:
        if isinstance(r, dict):
            out.append([r.get("name", ""), r.get("value", ""), r.get("status", ""), r.get("advice", "")])
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px}.status{font-weight:bold;padding:2px 8px;border-radius:4px;color:#fff}
.healthy{background:#2ca02c}.recovered{background:#17becf}.no_data{background:#9467bd}.warning{background:#e6a100}.critical{background:#d62728}
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4;white-space:nowrap}
td{white-space:pre-wrap;overflow-wrap:break-word;word-break:normal}td.num{white-space:nowrap}
.plot{width:100%;min-height:300px}.note{color:#666;font-size:12px}
"""

_BOOT = """
(function(){
  var ids = JSON.parse(document.getElementById('lossguard-figures').textContent);
  ids.forEach(function(id){
    var fig = JSON.parse(document.getElementById('fig-data-' + id).textContent);
    Plotly.newPlot('fig-' + id, fig.data, fig.layout, {responsive: true, displaylogo: false});
  });
  document.body.setAttribute('data-plots-ready', String(ids.length));
})();
"""


def render_html(live: LiveRun, *, title: str | None = None, plotly_js: str | None = None,
                now: float | None = None, plotly_src: str | None = None) -> str:
    """The full report page as a string (plotly.js embedded unless ``plotly_js`` is given, or
    loaded from the file ``plotly_src`` names, relative to the page)."""
    if plotly_src is not None:
        plotly_js = ""
    elif plotly_js is None:
        from plotly.offline import get_plotlyjs

        plotly_js = get_plotlyjs()
    plotly_js = _SCRIPT_CLOSE.sub(r"<\\/\1", plotly_js)
    now = time.time() if now is None else now
    name = title or live.run_dir.name or str(live.run_dir)
    figs = figures(live)
    last = live.last
    verdict = live.verdict()
    summary = [
        ["run directory", str(live.run_dir)],
        ["log read", f"{live.source_path} ({live.source_kind})" if live.source_path else "none"],
        ["steps", f"{last.step if last else '-'} of {live.max_steps or '?'} ({live.n_samples} samples)"],
        ["last loss", "-" if last is None or last.loss is None else f"{last.loss:.4g}"],
        ["smoothed loss", "-" if live.smoothed is None else f"{live.smoothed:.4g}"],
        ["findings", len(live.findings)],
        ["rollbacks", sum(1 for a in live.actions if a.action is ActionKind.ROLLBACK)],
        ["verdicts on rollbacks", _verdict_counts(live.actions)],
        ["run ended", "yes" if live.ended else "no (or not recorded)"],
        ["report written", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))],
    ]
    if live.loss.width > 1:
        summary.append(["display", f"curves thinned to min/max per {live.loss.width}-sample bucket; detection used every sample"])
    finding_rows = [[f.severity.value, f.step, f.onset_step, f.reason.value, f.message] for f in live.findings]
    action_rows = [[a.step, a.action.value, action_steps(a), a.lr_factor, a.message] for a in live.actions]
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>lossguard report: {html.escape(name)}</title>",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<style>{_CSS}</style>",
        (f"<script type=\"text/javascript\" src=\"{html.escape(plotly_src)}\"></script>" if plotly_src is not None
         else f"<script type=\"text/javascript\">{plotly_js}</script>"),
        "</head><body>",
        f"<h1>lossguard report: {html.escape(name)}</h1>",
        f"<div class=\"meta\">status <span class=\"status {verdict.status.value}\">"
        f"{verdict.status.label}</span> {html.escape(verdict.summary())}</div>",
        "<h2>Summary</h2>", _table(None, summary, "summary"),
    ]
    for fid, _ in figs:
        parts.append(f"<div class=\"plot\" id=\"fig-{fid}\"></div>")
    parts.append(f"<h2>Findings ({len(finding_rows)})</h2>")
    parts.append(_table(["severity", "step", "onset", "reason", "message"], finding_rows, "findings")
                 if finding_rows else "<p class=\"note\">No findings.</p>")
    probe_rows = [[p.get("step"), p.get("verdict"), probe_explanation(p)] for p in live.probes if not p.get("skipped")]
    if probe_rows:
        parts.append(f"<h2>Hessian probes ({len(probe_rows)})</h2>")
        parts.append(_table(["step", "verdict", "what it rests on"], probe_rows, "probes"))
    parts.append(f"<h2>Recovery actions ({len(action_rows)})</h2>")
    parts.append(_table(["step", "action", "steps involved", "lr factor", "message"], action_rows, "actions")
                 if action_rows else "<p class=\"note\">No recovery actions.</p>")
    pre = _preflight_rows(live.preflight)
    parts.append("<h2>Preflight</h2>")
    parts.append(_table(["check", "value", "status", "advice"], pre, "preflight") if pre
                 else "<p class=\"note\">No preflight record in this log.</p>")
    cfg = _config_rows(live.run)
    parts.append("<h2>Run configuration</h2>")
    parts.append(_table(["setting", "value"], cfg, "config") if cfg
                 else "<p class=\"note\">No run record in this log (foreign log source).</p>")
    if live.notes:
        parts.append("<h2>Reading notes</h2>")
        parts.append("".join(f"<p class=\"note\">{html.escape(n)}</p>" for n in live.notes))
    for fid, fig in figs:
        parts.append(f"<script type=\"application/json\" id=\"fig-data-{fid}\">{safe_json(fig)}</script>")
    parts.append(f"<script type=\"application/json\" id=\"lossguard-figures\">{safe_json([f for f, _ in figs])}</script>")
    parts.append(f"<script type=\"text/javascript\">{_BOOT}</script>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _verdict_counts(actions: list[Any]) -> str:
    kept = sum(1 for a in actions if a.action is ActionKind.KEEP)
    reverted = sum(1 for a in actions if a.action is ActionKind.REVERT)
    declined = sum(1 for a in actions if a.action is ActionKind.DECLINE)
    text = f"kept {kept}, reverted {reverted}" if kept or reverted else "-"
    return f"{text}, declined {declined}" if declined else text
