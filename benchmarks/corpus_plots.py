"""Render every log of the real-log corpus to PNG contact sheets, for labelling by eye.

    python benchmarks/corpus_plots.py                 # all logs, 12 per sheet
    python benchmarks/corpus_plots.py --ids hf-0003   # one big plot per id
    python benchmarks/corpus_plots.py --split dev

Each panel: the training loss (blue; non-finite values as red crosses at the top, zeros as
black dots), the eval loss (orange), the grad norm (grey, right axis, log scale), the learning
rate rescaled to the panel (green, thin), and the epoch boundaries (dotted). The title says
id, task, number of values and the current label. Output: ``benchmarks/corpus/plots/``
(git-ignored).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lossguard.testing.corpus import CorpusLog, corpus_dir, load_corpus  # noqa: E402

PER_SHEET = 12


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _eval_points(c: CorpusLog) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for e in c.log.evals:
        v = e.get("eval_loss")
        if isinstance(v, (int, float)) and math.isfinite(v) and isinstance(e.get("step"), int):
            xs.append(e["step"])
            ys.append(float(v))
    return xs, ys


def draw(ax, c: CorpusLog) -> None:
    s = c.log.samples
    steps = [x.step for x in s]
    loss = [x.loss for x in s]
    fin = [(st, v) for st, v in zip(steps, loss) if _finite(v)]
    if fin:
        ax.plot([p[0] for p in fin], [p[1] for p in fin], color="tab:blue", lw=1, marker="." if len(fin) < 60 else None, ms=3)
    ex, ey = _eval_points(c)
    if ex:
        ax.plot(ex, ey, color="tab:orange", lw=1, marker="o", ms=3)
    lo, hi = ax.get_ylim() if (fin or ex) else (0.0, 1.0)
    bad = [st for st, v in zip(steps, loss) if v is not None and not math.isfinite(v)]
    if bad:
        ax.plot(bad, [hi] * len(bad), "x", color="red", ms=5)
    zeros = [st for st, v in zip(steps, loss) if v == 0.0]
    if zeros:
        ax.plot(zeros, [0.0] * len(zeros), ".", color="black", ms=3)
    lrs = [(x.step, x.lr) for x in s if _finite(x.lr)]
    if lrs and max(v for _, v in lrs) > 0:
        top = max(v for _, v in lrs)
        ax.plot([p[0] for p in lrs], [lo + (hi - lo) * p[1] / top for p in lrs], color="tab:green", lw=0.6, alpha=0.7)
    gns = [(x.step, x.grad_norm) for x in s if _finite(x.grad_norm) and x.grad_norm > 0]
    if gns:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in gns], [p[1] for p in gns], color="grey", lw=0.6, alpha=0.6)
        ax2.set_yscale("log")
        ax2.tick_params(labelsize=6, colors="grey")
    gbad = [x.step for x in s if x.grad_norm is not None and not math.isfinite(x.grad_norm)]
    if gbad:
        ax.plot(gbad, [lo] * len(gbad), "^", color="purple", ms=4)
    bounds, last_ep = [], None
    for x in s:
        if _finite(x.epoch):
            ep = math.floor(x.epoch + 1e-9)
            if last_ep is not None and ep > last_ep:
                bounds.append(x.step)
            last_ep = ep
    if len(bounds) <= 30:  # more is a tiny dataset run for hundreds of epochs: lines would hide the curve
        for b in bounds:
            ax.axvline(b, color="k", ls=":", lw=0.6)
    vals = sorted(v for _, v in fin)
    if vals and vals[0] > 0 and vals[-1] > 50 * vals[len(vals) // 2]:
        ax.set_yscale("log")  # spikes of several orders of magnitude would flatten the rest
        lo, hi = vals[0] / 1.5, vals[-1] * 1.5
    ax.set_ylim(lo, hi)
    ax.tick_params(labelsize=6)
    ax.set_title(f"{c.id} {c.task}/{c.adapter} n={c.n_values} [{c.label.value}]", fontsize=7)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", nargs="*", help="one big plot per id instead of contact sheets")
    ap.add_argument("--split", choices=["dev", "test"])
    ap.add_argument("--out", type=Path, default=corpus_dir() / "plots")
    args = ap.parse_args(argv)
    logs = load_corpus(split=args.split)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ids:
        for c in [c for c in logs if c.id in set(args.ids)]:
            fig, ax = plt.subplots(figsize=(9, 4.5), dpi=90)
            draw(ax, c)
            fig.tight_layout()
            fig.savefig(args.out / f"{c.id}.png")
            plt.close(fig)
        return 0
    for start in range(0, len(logs), PER_SHEET):
        chunk = logs[start:start + PER_SHEET]
        fig, axes = plt.subplots(3, 4, figsize=(16, 9), dpi=75)
        for ax, c in zip(axes.flat, chunk):
            draw(ax, c)
        for ax in list(axes.flat)[len(chunk):]:
            ax.axis("off")
        fig.tight_layout()
        name = f"sheet-{start // PER_SHEET + 1:02d}-{chunk[0].id}-{chunk[-1].id}.png"
        fig.savefig(args.out / name)
        plt.close(fig)
        print(args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
