"""The live terminal dashboard of ``lossguard watch``: one rich renderable built from a ``LiveRun``.

Everything drawn comes from the log, so every piece of text taken from it goes into ``Text``
objects, never into markup: a finding message such as ``[bold]`` or ``<script>`` prints as
itself. Charts are drawn here with braille dots and block characters (no extra dependency).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lossguard.numbers import as_float
from lossguard.presentation.probe_text import probe_view
from lossguard.records import ActionKind, Severity, as_step
from lossguard.status import RunStatus
from lossguard.watch.downsample import MinMaxBuckets

if TYPE_CHECKING:
    from lossguard.watch.live import LiveRun

_SEVERITY_STYLE = {Severity.INFO: "cyan", Severity.WARNING: "yellow", Severity.CRITICAL: "bold red"}
_STATUS_STYLE = {RunStatus.NO_DATA: "bold magenta", RunStatus.HEALTHY: "bold green", RunStatus.RECOVERED: "bold cyan",
                 RunStatus.WARNING: "bold yellow", RunStatus.CRITICAL: "bold red"}
_BRAILLE_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
_BLOCKS = "▁▂▃▄▅▆▇█"


def _unit(f: float) -> float:
    """A position on an axis, clamped to [0, 1]; the middle where the scale overflowed (values
    near 1e308 make both the span and the offset infinite)."""
    return min(1.0, max(0.0, f)) if f == f else 0.5

def num(value: float | None, digits: int = 4) -> str:
    """A number for a narrow column: 4 significant digits, '-' when missing."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    a = abs(value)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{value:.{max(1, digits - 2)}e}"
    return f"{value:.{digits}g}"


def duration(seconds: float | None) -> str:
    """Seconds as h:mm:ss ('-' when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _x_range(*series: MinMaxBuckets) -> tuple[float, float] | None:
    spans = [(s.buckets[0].x_lo, s.buckets[-1].x_hi) for s in series if s.buckets]
    if not spans:
        return None
    return min(a for a, _ in spans), max(b for _, b in spans)


def line_chart(raw: MinMaxBuckets, smooth: MinMaxBuckets | None, width: int, height: int,
               *, raw_style: str = "blue", smooth_style: str = "bold bright_white") -> Text:
    """A braille chart: the raw curve's min-max band per column, the smoothed curve on top.

    ``width`` and ``height`` are in terminal cells (each cell is 2 x 4 dots). The y axis is
    labelled left, the first and last step below.
    """
    label_w = 9
    plot_w = max(4, width - label_w - 1)
    series = [raw] + ([smooth] if smooth is not None and smooth.buckets else [])
    xr = _x_range(*series)
    if xr is None:
        return Text("no finite values yet", style="dim")
    x_lo, x_hi = xr
    dots_x, dots_y = plot_w * 2, height * 4
    raw_cols = raw.columns(dots_x, x_lo, x_hi)
    smooth_cols = smooth.columns(dots_x, x_lo, x_hi) if smooth is not None else [None] * dots_x
    finite = [c for c in raw_cols if c is not None] + [c for c in smooth_cols if c is not None]
    y_lo = min(c[0] for c in finite)
    y_hi = max(c[1] for c in finite)
    if y_hi - y_lo < 1e-12 * max(1.0, abs(y_hi)):
        y_lo, y_hi = y_lo - 0.5 * max(abs(y_lo), 1e-3), y_hi + 0.5 * max(abs(y_hi), 1e-3)

    def row(y: float) -> int:
        return int(round(_unit((y_hi - y) / (y_hi - y_lo)) * (dots_y - 1)))

    cells = [[0] * plot_w for _ in range(height)]
    smooth_cell = [[False] * plot_w for _ in range(height)]

    def dot(xd: int, yd: int, is_smooth: bool) -> None:
        cx, cy = xd // 2, yd // 4
        cells[cy][cx] |= _BRAILLE_BITS[xd % 2][yd % 4]
        if is_smooth:
            smooth_cell[cy][cx] = True

    prev_c: tuple[float, float] | None = None
    for xd, c in enumerate(raw_cols):
        if c is None:
            continue
        lo, hi = c
        if prev_c is not None:  # close the gap to the previous column so a jump reads as a line
            if hi < prev_c[0]:
                hi = prev_c[0]
            elif lo > prev_c[1]:
                lo = prev_c[1]
        for yd in range(row(hi), row(lo) + 1):
            dot(xd, yd, False)
        prev_c = c
    prev: int | None = None
    for xd, c in enumerate(smooth_cols):
        if c is None:
            continue
        yd = row((c[0] + c[1]) / 2)
        lo, hi = (yd, yd) if prev is None else (min(prev, yd), max(prev, yd))
        for y in range(lo, hi + 1):
            dot(xd, y, True)
        prev = yd

    out = Text()
    labels = {0: num(y_hi), height - 1: num(y_lo)}
    if height >= 5:
        labels[height // 2] = num((y_hi + y_lo) / 2)
    for cy in range(height):
        out.append(f"{labels.get(cy, ''):>{label_w}}", style="dim")
        out.append("┤" if cy in labels else "│", style="dim")
        run_style: str | None = None
        run_chars: list[str] = []
        for cx in range(plot_w):
            bits = cells[cy][cx]
            style = smooth_style if smooth_cell[cy][cx] else raw_style
            ch = chr(0x2800 + bits) if bits else " "
            if style != run_style and run_chars:
                out.append("".join(run_chars), style=run_style)
                run_chars = []
            run_style = style
            run_chars.append(ch)
        if run_chars:
            out.append("".join(run_chars), style=run_style)
        out.append("\n")
    left, right = f"step {int(x_lo)}", f"step {int(x_hi)}"
    out.append(" " * (label_w + 1) + left + " " * max(1, plot_w - len(left) - len(right)) + right, style="dim")
    return out


def sparkline(series: MinMaxBuckets, width: int, *, peak: bool = True) -> Text:
    """One row of block characters: per column the maximum (``peak``) or the mean of min and max."""
    xr = _x_range(series)
    if xr is None:
        return Text("-", style="dim")
    cols = series.columns(width, *xr)
    vals = [None if c is None else (c[1] if peak else (c[0] + c[1]) / 2) for c in cols]
    finite = [v for v in vals if v is not None]
    lo, hi = min(finite), max(finite)
    span = hi - lo
    chars = []
    for v in vals:
        if v is None:
            chars.append(" ")
        else:
            i = 0 if span <= 0 else int(_unit((v - lo) / span) * (len(_BLOCKS) - 1))
            chars.append(_BLOCKS[i])
    return Text("".join(chars))


def bar(fraction: float | None, width: int) -> Text:
    """A horizontal bar filled to ``fraction`` (0..1)."""
    if fraction is None or not math.isfinite(fraction):
        return Text("?" * width, style="dim")
    f = min(1.0, max(0.0, fraction))
    full = int(round(f * width))
    t = Text("█" * full, style="green" if f >= 0.7 else "yellow" if f >= 0.3 else "red")
    t.append("░" * (width - full), style="dim")
    return t


def header(live: LiveRun, now: float) -> Text:
    t = Text()
    t.append("lossguard watch ", style="bold")
    t.append(str(live.run_dir))
    if live.source_kind:
        t.append("  source ", style="dim")
        t.append(f"{live.source_kind}")
    t.append("  status ", style="dim")
    verdict = live.verdict()
    if verdict.status is RunStatus.NO_DATA and live.waiting:
        t.append("WAITING", style="bold magenta")  # no evidence yet: neither healthy nor not
    else:
        t.append(verdict.status.label, style=_STATUS_STYLE.get(verdict.status, "bold"))
    if live.ended:
        t.append("  run ended", style="bold")
    if live.updated_at is not None:
        t.append(f"  updated {duration(max(0.0, now - live.updated_at))} ago", style="dim")
    if verdict.handled:
        t.append("\nhandled: " + ", ".join(f"{f.reason.value} at {f.step}" for f in verdict.handled), style="cyan")
        if verdict.open:
            t.append("  open: " + ", ".join(f"{f.reason.value} at {f.step}" for f in verdict.open), style="yellow")
    return t


def progress(live: LiveRun, width: int) -> Text:
    last = live.last
    t = Text()
    if last is None:
        t.append("no steps yet", style="dim")
        return t
    if live.max_steps:
        frac = last.step / live.max_steps
        t.append(f"step {last.step}/{live.max_steps} ")
        t.append_text(bar(frac, max(10, width - 60)))
        t.append(f" {100 * min(1.0, frac):5.1f}%")
    else:
        t.append(f"step {last.step} (max_steps unknown)")
    per = live.seconds_per_step()
    t.append(f"  {num(per, 3)} s/step" if per is not None else "  - s/step", style="dim")
    t.append(f"  ETA {duration(live.eta_seconds())}")
    return t


def _latest_values(live: LiveRun) -> Text:
    last = live.last
    t = Text()
    if last is None:
        return t
    t.append("loss ", style="dim")
    t.append(num(last.loss), style="bold red" if last.loss is not None and not math.isfinite(last.loss) else "bold")
    t.append("  smoothed ", style="dim")
    t.append(num(live.smoothed))
    t.append("  grad norm ", style="dim")
    t.append(num(last.grad_norm))
    t.append("  lr ", style="dim")
    t.append(num(last.lr))
    if live.loss.nonfinite_count:
        first = int(live.loss.nonfinite[0]) if live.loss.nonfinite else None
        t.append(f"\nnon-finite loss at {live.loss.nonfinite_count} step(s), first at step {first}", style="bold red")
    return t


_STATE_ACTIONS = (ActionKind.ROLLBACK, ActionKind.LR_OVERRIDE, ActionKind.LR_RESTORE, ActionKind.GIVE_UP,
                  ActionKind.REVERT)


def pending_verdict(actions: list[Any]) -> int | None:
    """The step at which the safety net judges the last rollback, while no verdict came yet."""
    for a in reversed(actions):
        if a.action in (ActionKind.KEEP, ActionKind.REVERT, ActionKind.DECLINE):
            return None
        if a.action is ActionKind.ROLLBACK and "verdict_step" in a.details:
            return as_step(a.details["verdict_step"])
    return None


def recovery_state(live: LiveRun) -> Text:
    """NORMAL / LOW LR / GAVE UP, from the action records, with the rollback count and the
    safety net's verdicts (kept, reverted, and when a pending one is due)."""
    rollbacks = sum(1 for a in live.actions if a.action is ActionKind.ROLLBACK)
    t = Text()
    last = next((a for a in reversed(live.actions) if a.action in _STATE_ACTIONS), None)
    if last is None:
        t.append("NORMAL", style="bold green")
    elif last.action is ActionKind.GIVE_UP:
        t.append("GAVE UP", style="bold red")
        t.append(f" at step {last.step}")
    elif last.action is ActionKind.LR_RESTORE:
        t.append("NORMAL", style="bold green")
        t.append(f" (LR restored at step {last.step})")
    elif last.action is ActionKind.REVERT:
        t.append("NORMAL", style="bold green")
        t.append(f" (reverted to the head of step {last.to_step} at step {last.step})")
    else:
        phase = live.lr_phases()
        factor = phase[-1][2] if phase and phase[-1][1] is None else last.lr_factor
        t.append("LOW LR", style="bold yellow")
        t.append(f" x{num(factor, 3)} since step {last.step}" if factor is not None else f" since step {last.step}")
    t.append(f"   rollbacks {rollbacks}", style="dim")
    kept = sum(1 for a in live.actions if a.action is ActionKind.KEEP)
    reverted = sum(1 for a in live.actions if a.action is ActionKind.REVERT)
    declined = sum(1 for a in live.actions if a.action is ActionKind.DECLINE)
    if kept or reverted:
        t.append(f"  kept {kept}  reverted {reverted}", style="dim")
    if declined:
        t.append(f"  declined {declined}", style="dim")
    due = pending_verdict(live.actions)
    if due is not None:
        t.append(f"  verdict due at step {due}", style="yellow")
    if live.actions:
        a = live.actions[-1]
        t.append(f"\nstep {a.step} {a.action.value}: ", style="magenta")
        t.append(a.message)
    return t


def gpu_view(live: LiveRun, width: int) -> Text | None:
    """One bar per GPU from the latest gpu record (None when the run has none)."""
    rec = live.gpu_last
    if not rec or not isinstance(rec.get("gpus"), list):
        return None
    t = Text()
    for i, g in enumerate(rec["gpus"]):
        if not isinstance(g, dict):
            continue
        idx = g.get("index", i)
        util = as_float(g.get("util_mean"))
        t.append(f"GPU{idx!s:<2} ")
        t.append_text(bar(None if util is None else util / 100, max(10, min(30, width - 70))))
        t.append(f" {num(util, 3):>4}%")
        p5, p95 = as_float(g.get("util_p5")), as_float(g.get("util_p95"))
        if p5 is not None or p95 is not None:
            t.append(f"  p5 {num(p5, 3)} p95 {num(p95, 3)}", style="dim")
        used, total = as_float(g.get("memory_used_mib")), as_float(g.get("memory_total_mib"))
        if used is not None:
            t.append(f"  mem {used / 1024:.1f}" + (f"/{total / 1024:.1f}" if total else "") + " GiB")
        power = as_float(g.get("power_w"))
        if power is not None:
            t.append(f"  {power:.0f} W")
        t.append("\n")
    t.rstrip()
    return t


def findings_feed(live: LiveRun, limit: int = 8) -> RenderableType:
    """The newest findings first, severity coloured; messages printed literally."""
    if not live.findings:
        return Text("no findings", style="dim")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True, justify="right")
    grid.add_column(no_wrap=True)
    grid.add_column(ratio=1)
    shown = live.findings[-limit:][::-1]
    for f in shown:
        grid.add_row(Text(f.severity.value, style=_SEVERITY_STYLE.get(f.severity, "")), Text(f"step {f.step}"),
                     Text(f.reason.value, style="bold"), Text(f.message))
    more = len(live.findings) - len(shown)
    if more > 0:
        grid.add_row(Text(f"... and {more} earlier", style="dim"), "", "", "")
    return grid


def render(live: LiveRun, *, width: int = 100, now: float | None = None, chart_height: int = 8) -> RenderableType:
    """The whole dashboard for a console ``width`` cells wide."""
    now = time.time() if now is None else now
    parts: list[RenderableType] = [header(live, now)]
    if live.waiting and live.last is None:
        parts.append(Panel(Text(live.waiting, style="yellow"), title="waiting", title_align="left"))
        parts.extend(Text(n, style="dim") for n in list(live.notes)[-3:])
        return Group(*parts)
    if live.waiting:
        parts.append(Text(live.waiting, style="yellow"))
    parts.append(progress(live, width))
    inner = width - 4
    loss_body = Text()
    loss_body.append_text(line_chart(live.loss, live.loss_smooth, inner, chart_height))
    loss_body.append("\n")
    loss_body.append_text(_latest_values(live))
    parts.append(Panel(loss_body, title="loss (raw band, smoothed line)", title_align="left"))
    half = (width - 6) // 2
    curves = Table.grid(expand=True)
    curves.add_column(ratio=1)
    curves.add_column(ratio=1)
    curves.add_row(
        Panel(sparkline(live.grad_norm, half - 4), title=f"grad norm (peak)  last {num(live.last.grad_norm if live.last else None)}",
              title_align="left"),
        Panel(sparkline(live.lr, half - 4, peak=False), title=f"learning rate  last {num(live.last.lr if live.last else None)}",
              title_align="left"),
    )
    parts.append(curves)
    state = Table.grid(expand=True)
    state.add_column(ratio=1)
    state.add_column(ratio=1)
    state.add_row(Panel(recovery_state(live), title="recovery", title_align="left"),
                  Panel(probe_view(live), title="Hessian probe", title_align="left"))
    parts.append(state)
    gpus = gpu_view(live, width)
    if gpus is not None:
        parts.append(Panel(gpus, title="GPUs (latest interval)", title_align="left"))
    parts.append(Panel(findings_feed(live), title=f"findings ({len(live.findings)})", title_align="left"))
    for n in list(live.notes)[-2:]:
        parts.append(Text(n, style="dim"))
    return Group(*parts)


def summary_line(live: LiveRun) -> str:
    """One plain line for logs: step, loss, status, finding count."""
    last = live.last
    step: Any = last.step if last else "-"
    return (f"step {step}/{live.max_steps or '?'} loss {num(last.loss if last else None)} "
            f"status {live.status.value} findings {len(live.findings)}")
