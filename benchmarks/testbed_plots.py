"""Plots of the testbed's scenarios for docs/benchmarks.md, and its healthy curves beside real ones.

    python benchmarks/detection.py --testbed-only --testbed-curves /tmp/testbed.json
    python benchmarks/testbed_plots.py /tmp/testbed.json

Writes ``docs/testbed_vs_corpus.png`` (the testbed's healthy one-epoch and three-epoch SFT next to
healthy and staircase SFT logs of the real-log corpus, each loss divided by its first value,
against the epoch) and ``docs/testbed_scenarios.png`` (every scenario's loss, lossguard's
findings as vertical lines).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lossguard.testing.corpus import load_corpus  # noqa: E402

REAL_ONE_EPOCH = ("hf-0015", "hf-0044", "hf-0054", "hf-0084")
REAL_STAIRCASE = ("hf-0036", "hf-0093", "hf-0067")
COLOURS = {"nonfinite": "red", "spike": "orange", "divergence": "purple", "early_convergence": "green"}


def _real(ids: tuple[str, ...]) -> list[tuple[str, list[float], list[float]]]:
    out = []
    by_id = {c.id: c for c in load_corpus()}
    for i in ids:
        c = by_id.get(i)
        if c is None:
            continue
        pts = [(s.epoch, s.loss) for s in c.log.samples
               if s.loss is not None and math.isfinite(s.loss) and s.epoch is not None]
        if len(pts) < 5:
            continue
        first = pts[0][1]
        out.append((f"{i} ({c.adapter}, {c.model or 'model?'})", [p[0] for p in pts], [p[1] / first for p in pts]))
    return out


def _ours(d: dict, name: str) -> tuple[list[float], list[float]]:
    run = d[name]
    first = run["loss"][0]
    return run["epoch"], [v / first for v in run["loss"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("curves", help="JSON written by detection.py --testbed-curves")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args(argv)
    d = json.loads(Path(args.curves).read_text(encoding="utf-8"))
    out = Path(args.out)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, ours, ids, title in ((axes[0], "sft-lora-1epoch", REAL_ONE_EPOCH, "one epoch"),
                                 (axes[1], "sft-full-3epoch", REAL_STAIRCASE, "three epochs (staircase)")):
        for label, x, y in _real(ids):
            ax.plot(x, y, lw=1, alpha=0.8, label=f"real: {label}")
        if ours in d:
            x, y = _ours(d, ours)
            ax.plot(x, y, lw=2.2, color="black", label=f"testbed: {ours}")
        ax.set_title(f"healthy SFT, {title}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss / first logged loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "testbed_vs_corpus.png", dpi=110)

    names = list(d)
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        run = d[name]
        steps = run["steps"]
        loss = [v if math.isfinite(v) else float("nan") for v in run["loss"]]
        ax.plot(steps, loss, lw=1.2)
        bad = [s for s, v in zip(steps, run["loss"]) if not math.isfinite(v)]
        if bad:
            top = max((v for v in loss if v == v), default=1.0)
            ax.plot(bad, [top] * len(bad), "rx", ms=4)
        for s in run["outcome"].get("culprit_steps", []):
            ax.axvline(s, color="grey", ls=":", lw=1)
        if "prior_entropy" in run["outcome"]:
            ax.axhline(run["outcome"]["prior_entropy"], color="grey", ls="--", lw=1)
        if "preference_accuracy" in run["outcome"]:  # a DPO loss: ln 2 is the policy still at its reference
            ax.axhline(math.log(2), color="grey", ls="--", lw=1)
        for f in run["findings"]:
            ax.axvline(f["step"], color=COLOURS.get(f["reason"], "black"), lw=1, alpha=0.7)
        found = sorted({f["reason"] for f in run["findings"]}) or ["nothing"]
        ax.set_title(f"{name}\nexpected {run['expected']}; lossguard: {', '.join(found)}", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "testbed_scenarios.png", dpi=100)
    print(f"wrote {out / 'testbed_vs_corpus.png'} and {out / 'testbed_scenarios.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
