"""Detection quality on labelled synthetic curves, and the throughput of ``watch --once``.

    .venv/bin/python benchmarks/detection.py [--quick] [--throughput-only]

Prints, per detector, per logging interval (every step, every 10, every 20 steps) and per seed
set (three independent sets of curves, so that figures tuned on one set are checked on two):
precision, recall, false alarms per healthy run and median latency from the labelled onset,
against the targets of issue 3. Then writes a 1,000,000-sample events.jsonl and times reading
it alone (the baseline) against the full ``once()`` (read + detect + JSON).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

from lossguard.records import Reason
from lossguard.signals.synthetic import SCORED, Curve, Score, score, standard_set

TARGET_RECALL = {Reason.SPIKE: 0.95, Reason.DIVERGENCE: 0.95, Reason.NONFINITE: 0.95, Reason.EARLY_CONVERGENCE: 0.9}


SEED_SETS = (0, 77_000, 155_000)  # independent curve sets: a detector tuned on one must hold on all
PLATEAU_KINDS = ("plateau", "stuck", "plateau_resolves")  # the curve kinds labelled early_convergence


def quality(healthy: int, per_anomaly: int, seed_sets: tuple[int, ...] = SEED_SETS) -> bool:
    ok = True
    t0 = time.perf_counter()
    all_parts: list[dict[Reason, Score]] = []
    per_set = []
    by_kind: dict[tuple[str, int], list[int]] = {}  # (plateau kind, interval) -> latencies
    for base in seed_sets:
        parts = []
        for k in (1, 10, 20):
            curves = standard_set(healthy=healthy, per_anomaly=per_anomaly, log_every=(k,), seed=1000 * k + base)
            print(f"\nseed set {base}, logging every {k} step(s): {len(curves)} curves, "
                  f"{sum(len(c.samples) for c in curves)} samples")
            kinds: dict[str, list[Curve]] = {}
            for c in curves:
                kinds.setdefault(c.kind, []).append(c)
            scored = {kind: score(group) for kind, group in kinds.items()}  # each curve once
            for kind, sc in scored.items():
                if kind in PLATEAU_KINDS:
                    by_kind.setdefault((kind, k), []).extend(sc[Reason.EARLY_CONVERGENCE].latencies)
            parts.append(_table(_merge(list(scored.values()))))
        per_set.append((base, _merge(parts)))
        all_parts.extend(parts)
    print(f"\nall {len(seed_sets)} seed sets and intervals together:")
    scores = _table(_merge(all_parts))
    for reason, target in TARGET_RECALL.items():
        sc = scores[reason]
        good = sc.recall >= target
        ok &= good
        print(f"  target recall {reason.value} >= {target}: {sc.recall:.3f} {'OK' if good else 'MISSED'}")
    ec = scores[Reason.EARLY_CONVERGENCE]
    good = ec.median_latency <= 100
    ok &= good
    print(f"  target early_convergence median latency <= 100 steps: {ec.median_latency:.0f} {'OK' if good else 'MISSED'}")
    runs = ec.healthy_runs
    false_runs = ec.healthy_runs_alarmed + scores[Reason.DIVERGENCE].healthy_runs_alarmed
    per50 = 50.0 * false_runs / runs
    good = per50 <= 1.0
    ok &= good
    print(f"  target <= 1 false early_convergence/divergence per 50 healthy runs: {false_runs} in {runs} "
          f"= {per50:.2f} per 50 {'OK' if good else 'MISSED'}")
    for base, s in per_set:
        e = s[Reason.EARLY_CONVERGENCE]
        fr = e.healthy_runs_alarmed + s[Reason.DIVERGENCE].healthy_runs_alarmed
        print(f"    seed set {base}: early_convergence recall {e.recall:.3f}, median latency {e.median_latency:.0f}, "
              f"false alarms {fr} in {e.healthy_runs}")
    print("  early_convergence median latency (quartiles) by kind and logging interval:")
    for kind in PLATEAU_KINDS:
        cells = [_quartiles(by_kind.get((kind, k), [])) for k in (1, 10, 20)]
        every = _quartiles([v for k in (1, 10, 20) for v in by_kind.get((kind, k), [])])
        print(f"    {kind:<17} every step {cells[0]}, every 10 {cells[1]}, every 20 {cells[2]}; all {every}")
    cells = [_quartiles([v for kind in PLATEAU_KINDS for v in by_kind.get((kind, k), [])]) for k in (1, 10, 20)]
    print(f"    {'all kinds':<17} every step {cells[0]}, every 10 {cells[1]}, every 20 {cells[2]}")
    print(f"  quality evaluation took {time.perf_counter() - t0:.1f} s")
    return ok


def _quartiles(v: list[int] | list[float]) -> str:
    if not v:
        return "-"
    q1, q2, q3 = np.percentile(v, [25, 50, 75])
    return f"{q2:.0f} ({q1:.0f}-{q3:.0f})"


def _merge(parts: list[dict[Reason, Score]]) -> dict[Reason, Score]:
    """Scores of several curve sets as if scored together (every count adds up)."""
    out = {r: Score(r) for r in SCORED}
    for part in parts:
        for r, sc in part.items():
            m = out[r]
            for name in ("labels", "detected", "findings", "matched", "healthy_runs", "healthy_findings",
                         "healthy_runs_alarmed"):
                setattr(m, name, getattr(m, name) + getattr(sc, name))
            m.latencies.extend(sc.latencies)
    return out


def _table(scores):
    print(f"  {'detector':<18}{'labels':>7}{'recall':>8}{'precision':>10}{'FA/healthy':>11}{'med.lat':>8}")
    for reason in SCORED:
        sc = scores[reason]
        print(f"  {reason.value:<18}{sc.labels:>7}{sc.recall:>8.3f}{sc.precision:>10.3f}"
              f"{sc.false_alarms_per_healthy_run:>11.3f}{sc.median_latency:>8.0f}")
    return scores


def throughput(n: int) -> None:
    from lossguard.analysis import analyze
    from lossguard.cli.watch_once import once
    from lossguard.signals.suite import DetectorSuite
    from lossguard.telemetry import EventWriter, open_run

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        path = run / "lossguard" / "events.jsonl"
        t0 = time.perf_counter()
        steps = np.arange(1, n + 1)
        loss = 0.8 + 2.0 * (1 + steps / 200.0) ** -0.4 * (1 + 0.05 * rng.standard_normal(n))
        gn = 1.0 * np.exp(0.2 * rng.standard_normal(n))
        lr = 2e-4 * (1 - steps / n)
        with EventWriter(path, clock=lambda: 1.7e9) as w:
            w.write("run", max_steps=n, num_train_epochs=1.0)
        with open(path, "a", encoding="utf-8") as fh:  # bulk: the lines EventWriter writes, minutes sooner
            for i in range(n):
                fh.write(json.dumps({"v": 1, "t": 1.7e9 + i, "kind": "sample", "step": int(steps[i]),
                                     "loss": float(loss[i]), "grad_norm": float(gn[i]), "lr": float(lr[i]),
                                     "epoch": float(steps[i]) / n, "step_time_s": 0.1, "tokens": 4096},
                                    separators=(",", ":")) + "\n")
        size = path.stat().st_size
        print(f"\nthroughput: wrote {n} samples ({size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        log = open_run(run)
        t_read = time.perf_counter() - t0
        print(f"  read only (open_run, baseline):        {t_read:6.2f} s  ({1e6 * t_read / n:.2f} us/sample)")

        samples = log.samples[:50_000]
        t0 = time.perf_counter()
        suite = DetectorSuite(max_steps=n)
        for s in samples:
            suite.observe(s)
        t_det = time.perf_counter() - t0
        print(f"  online path (observe, first 50k):      {t_det:6.2f} s  ({1e6 * t_det / len(samples):.2f} us/step)")

        t0 = time.perf_counter()
        cols = open_run(run, columns=True).columns
        t_cols = time.perf_counter() - t0
        print(f"  columnar read (open_run columns=True): {t_cols:6.2f} s")
        t0 = time.perf_counter()
        suite = DetectorSuite(max_steps=n)
        suite.observe_many(cols.steps, cols.loss, cols.grad_norm, cols.lr, cols.epoch,
                           has_loss=cols.has_loss, has_grad_norm=cols.has_grad_norm)
        t_many = time.perf_counter() - t0
        print(f"  batch path (observe_many, all):        {t_many:6.2f} s  ({1e6 * t_many / n:.2f} us/sample)")
        parts = _per_detector(DetectorSuite(max_steps=n), cols)
        print("    per detector (update_many): " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))

        t0 = time.perf_counter()
        analyze(log)
        t_an = time.perf_counter() - t0
        print(f"  analyze(log) on the read log:           {t_an:6.2f} s")

        t0 = time.perf_counter()
        buf = io.StringIO()
        with redirect_stdout(buf):
            code = once(str(run), True, None)
        t_once = time.perf_counter() - t0
        out = json.loads(buf.getvalue())
        print(f"  once(run, --json) end to end:           {t_once:6.2f} s  (target < 5 s; "
              f"{t_once / t_read:.2f}x the read alone); exit {code}, status {out['status']}, "
              f"{len(out['findings'])} findings")


def _per_detector(suite: Any, cols: Any) -> dict[str, float]:
    """Seconds in each detector's batch path over the whole log (the suite's order and inputs)."""
    st, loss, gn, lr, ep = cols.steps, cols.loss, cols.grad_norm, cols.lr, cols.epoch
    hl, hg = cols.has_loss, cols.has_grad_norm
    calls = {
        "nonfinite": lambda: suite.nonfinite.update_many(st, loss, gn, hl, hg),
        "degenerate": lambda: suite.degenerate.update_many(st, loss),
        "gradients": lambda: suite.gradients.update_many(st, loss, gn, hl, hg),
        "spike": lambda: suite.spike.update_many(st, loss),
        "grad_explosion": lambda: suite.grad_explosion.update_many(st, gn, loss),
        "divergence": lambda: suite.divergence.update_many(st, loss, lr),
        "plateau": lambda: suite.plateau.update_many(st, loss, lr, ep),
    }
    out = {}
    for name, call in calls.items():
        t0 = time.perf_counter()
        call()
        out[name] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer curves")
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--samples", type=int, default=1_000_000)
    args = ap.parse_args()
    ok = True
    if not args.throughput_only:
        ok = quality(20 if args.quick else 50, 8 if args.quick else 20, SEED_SETS[:1] if args.quick else SEED_SETS)
    throughput(args.samples)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
