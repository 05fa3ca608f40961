"""Make the README's screenshots (docs/dashboard.png, docs/report.png) from a real run directory.

    python scripts/screenshots.py demo-run        # after `make demo`

The dashboard is the same rich renderable `lossguard watch` shows, recorded as SVG and rasterised
by headless Chromium; the report is `report.html` as Chromium renders it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from lossguard.cli.report import command as write_report
from lossguard.presentation.dashboard import render
from lossguard.watch.live import read_run

DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--hide-scrollbars"]


def shoot(url: str, out: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([*CHROMIUM, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)


def main(run_dir: str) -> int:
    live = read_run(run_dir)
    console = Console(record=True, width=110, file=open("/dev/null", "w"))
    console.print(render(live, width=110))
    with tempfile.TemporaryDirectory() as tmp:
        svg = Path(tmp) / "dashboard.svg"
        svg.write_text(console.export_svg(title=f"lossguard watch {Path(run_dir).name}"))
        shoot(svg.as_uri(), DOCS / "dashboard.png", 1400, 1000)
    report = Path(run_dir) / "lossguard" / "report.html"
    write_report(run_dir=run_dir, output=str(report))
    shoot(report.resolve().as_uri(), DOCS / "report.png", 1300, 1500)
    print(f"wrote {DOCS / 'dashboard.png'} and {DOCS / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "demo-run"))
