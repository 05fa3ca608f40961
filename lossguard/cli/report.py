"""``lossguard report RUN_DIR -o report.html``: one self-contained HTML file, works offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lossguard.errors import LossguardError

if TYPE_CHECKING:
    from lossguard.watch.live import LiveRun


def shared_plotly(folder: Path) -> str:
    """plotly.js as one file in ``folder`` (written once per plotly version, then reused by every
    report there); returns its name, for the page's ``<script src>``."""
    import plotly
    from plotly.offline import get_plotlyjs

    name = f"plotly-{plotly.__version__}.min.js"
    path = folder / name
    if not path.is_file():
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(get_plotlyjs(), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise LossguardError(f"{path}: cannot write ({err.strerror or err})") from None
    return name


def write_report(run_dir: str, output: str | None = None, *, shared: bool = False) -> tuple[Path, int, LiveRun]:
    """Read the run, write the report; returns (path, bytes written, the run as read).

    ``shared``: plotly.js goes into a file beside the report (``plotly-<version>.min.js``) that
    every report in that folder shares, instead of 4-5 MB inlined into each page; the page then
    needs that file next to it (still no network).
    """
    from lossguard.presentation.report import render_html
    from lossguard.watch.live import read_run

    live = read_run(run_dir)
    out = Path(output) if output else Path(run_dir) / "lossguard" / "report.html"
    if out.is_dir():
        raise LossguardError(f"{out}: is a directory; give a file name, e.g. -o {out / 'report.html'}")
    page = render_html(live, plotly_src=shared_plotly(out.parent) if shared else None)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise LossguardError(f"{out}: cannot write ({err.strerror or err})") from None
    return out, len(page.encode()), live


def command(run_dir: str, output: str | None = None, shared_plotly: bool = False) -> int:
    """Write the report and say where; 0 on success."""
    out, size, live = write_report(run_dir, output, shared=shared_plotly)
    for note in live.notes:
        print(f"lossguard: {note}", file=sys.stderr)
    print(f"lossguard: wrote {out} ({size / 1e6:.1f} MB): {live.n_samples} steps, "
          f"{len(live.findings)} finding(s), status {live.status.value}", file=sys.stderr)
    return 0
