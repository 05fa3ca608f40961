"""The HTML report opened in real headless Chromium: loads, draws its plots, keeps hostile text inert."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lossguard.presentation.report import render_html
from lossguard.telemetry import EventWriter
from lossguard.watch.live import read_run

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "<img src=x onerror=\"window.__pwned=1;alert(1)\"></script><script>window.__pwned=2;alert(2)</script>"


def _needs_chromium() -> None:
    if CHROMIUM.exists():
        return
    why = f"{CHROMIUM} is missing (install Debian's chromium: make browser)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def _hostile_run(run_dir: Path, steps: int = 300) -> None:
    with EventWriter(run_dir / "lossguard" / "events.jsonl", clock=lambda: 1000.0) as w:
        w.write("run", max_steps=steps, num_train_epochs=1.0, output_dir=HOSTILE)
        w.write_record({"kind": "preflight", "rows": [{"name": HOSTILE, "value": "1", "status": "warn", "advice": HOSTILE}]})
        for i in range(1, steps + 1):
            w.write("sample", step=i, loss=2.0 + (i % 7) * 0.01 + (20.0 if i == 150 else 0.0), grad_norm=1.0, lr=1e-3)
            if i == 151:
                w.write_record({"kind": "finding", "reason": "spike", "severity": "warning", "step": 151,
                                "onset_step": 150, "message": HOSTILE})
        w.write_record({"kind": "probe", "step": 200, "lambda_max": 3.0, "lambda_min": -0.4, "ratio": -0.13,
                        "verdict": HOSTILE})
        w.write_record({"kind": "gpu", "step": 200, "gpus": [{"index": 0, "util_mean": 80.0}]})


def test_report_loads_plots_and_keeps_hostile_text_inert(tmp_path: Path, artifacts_dir: Path) -> None:
    _needs_chromium()
    from playwright.sync_api import sync_playwright

    _hostile_run(tmp_path / "run")
    page_path = tmp_path / "report.html"
    page_path.write_text(render_html(read_run(tmp_path / "run")), encoding="utf-8")
    errors: list[str] = []
    dialogs: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2000})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.wait_for_selector("body[data-plots-ready]", timeout=20000)
            n_plots = page.locator(".js-plotly-plot").count()
            pwned = page.evaluate("window.__pwned === undefined ? null : window.__pwned")
            findings_text = page.locator("table.findings").inner_text()
            preflight_text = page.locator("table.preflight").inner_text()
            page.screenshot(path=str(artifacts_dir / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert dialogs == []
    assert pwned is None
    assert n_plots == 5  # loss, grad norm, lr, probes, gpu
    assert HOSTILE in findings_text  # shown literally, as text
    assert HOSTILE in preflight_text
    assert [u for u in requests if not u.startswith("file:")] == []  # offline: nothing fetched
    assert (artifacts_dir / "report.png").stat().st_size > 10_000
