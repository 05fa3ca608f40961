"""A Hessian probe record in words: each batch group's verdict, and why a verdict is inconclusive.

The console, the dashboard and the report read the same sentence, so "inconclusive" is never
shown with a bare ratio that would read as a minimum by the guide's thresholds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text

from lossguard.numbers import as_float, fmt

if TYPE_CHECKING:
    from lossguard.watch.live import LiveRun


def probe_groups(p: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per probe batch group (older records without ``groups``: the record itself)."""
    groups = p.get("groups")
    if isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups):
        return groups
    return [p]


def probe_explanation(p: dict[str, Any]) -> str:
    """What a probe's verdict rests on, in words: each group's verdict and ratio, and why the
    verdict is inconclusive when it is (the groups disagree, or the time ran out)."""
    verdict = str(p.get("verdict", "?"))
    groups = probe_groups(p)
    parts = []
    for g in groups:
        r = as_float(g.get("ratio"))
        parts.append(f"{g.get('verdict', '?')} (lambda_min/lambda_max {'n/a' if r is None else f'{r:.3g}'})")
    text = f"{verdict}: " + ("; ".join(f"group {i + 1} {s}" for i, s in enumerate(parts)) if len(groups) > 1
                              else parts[0])
    if verdict == "inconclusive":
        kinds = {str(g.get("verdict")) for g in groups}
        if len(kinds) > 1:
            text += ". The probe batches disagree, so no verdict stands (every group must agree)"
        elif p.get("message"):
            text += f". {p.get('message')}"
        text += ("; thresholds: r < -0.05 saddle, -0.05 to -0.01 inconclusive, >= -0.01 minimum-like, "
                 "on every group")
    return text


def probe_view(live: LiveRun) -> Text:
    """The latest Hessian probe: extremes of the curvature and what they mean."""
    if not live.probes:
        return Text("no probe yet", style="dim")
    p = live.probes[-1]
    verdict = str(p.get("verdict", "?"))
    t = Text()
    t.append(f"step {p.get('step', '?')}: ")
    t.append("λmax ", style="dim")
    t.append(fmt(as_float(p.get("lambda_max"))))
    t.append("  λmin ", style="dim")
    t.append(fmt(as_float(p.get("lambda_min"))))
    t.append("  ratio ", style="dim")
    t.append(fmt(as_float(p.get("ratio"))))
    t.append("  → ")
    t.append(verdict, style="bold yellow" if "saddle" in verdict else "bold")
    if verdict == "inconclusive":
        t.append("\n" + probe_explanation(p), style="dim")
    return t
