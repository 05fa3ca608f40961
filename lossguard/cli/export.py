"""``lossguard export RUN_DIR -o FILE.csv``: one row per optimizer step, for spreadsheets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lossguard.errors import LossguardError


def command(run_dir: str, output: str = "lossguard-samples.csv") -> int:
    """Write the run's samples (with the findings detected at each step) as CSV; 0 on success.

    ``-o -`` writes the CSV to stdout; what lossguard says about it always goes to stderr, so a
    pipe gets the data alone.
    """
    from lossguard.presentation.frames import load_run

    out = Path(output)
    if output != "-" and out.is_dir():
        raise LossguardError(f"{out}: is a directory; give a file name, e.g. -o {out / 'samples.csv'}")
    frames = load_run(run_dir)
    df = frames.samples.copy()
    found: dict[int, list[str]] = {}
    for step, reason in zip(frames.findings["step"], frames.findings["reason"], strict=True):
        found.setdefault(int(step), []).append(str(reason))
    df["findings"] = [";".join(found.get(int(s), [])) for s in df["step"]]
    for note in frames.notes:
        print(f"lossguard: {note}", file=sys.stderr)
    if output == "-":
        df.to_csv(sys.stdout, index=False)
        sys.stdout.flush()
        print(f"lossguard: wrote {len(df)} steps to stdout", file=sys.stderr)
        return 0
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise LossguardError(f"{out}: cannot write ({err.strerror or err})") from None
    print(f"lossguard: wrote {out}: {len(df)} steps, {len(frames.findings)} finding(s) from {frames.source_path}",
          file=sys.stderr)
    return 0
