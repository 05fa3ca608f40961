"""Detection quality on labelled synthetic curves and real logs, beside the rules people use
instead of lossguard, and the throughput of ``watch --once``.

    .venv/bin/python benchmarks/detection.py [--quick] [--throughput-only] [--no-corpus] [--no-throughput] [--detail]
                                             [--no-testbed] [--testbed-only] [--testbed-curves FILE]

1. Synthetic curves (``lossguard/testing/synthetic.py``): per detector, per logging interval
   (every step, every 10, every 20 steps) and per seed set (three independent sets of curves,
   so that figures tuned on one set are checked on two): precision, recall, false alarms per
   healthy run and median latency from the labelled onset, against the targets of issue 3.
2. Peers side by side (issue 17): on the same curves, one table per reason with a row for
   lossguard and each peer rule that speaks to that reason (``lossguard/testing/peers.py``),
   scored alike (``lossguard/testing/scoring.py``): precision, recall, F1, healthy runs
   alarmed, median latency. A rule with a knob also gets a row at the setting that gave its
   best F1 on seed set 0 (``--detail``: which kinds of curve each rule alarms on).
3. The same tables on the corpus of real logs (``benchmarks/corpus``), per split: ``dev`` to
   look at, ``test`` for the figures in docs (nothing is tuned on it).
4. Real runs beside the real logs: every scenario of the testbed
   (``lossguard/testing/testbed/scenarios.py``: a base pretrained here, fine-tuned by a real
   ``Trainer``, healthy or troubled for a known reason) with ``LossGuard`` attached, recovery off,
   so the run is the one measured without it: lossguard's findings per scenario, beside what
   the scenario is expected to show and its outcome (``--testbed-curves``: the curves as JSON,
   for ``benchmarks/testbed_plots.py``).
5. Writes a 1,000,000-sample events.jsonl and times reading it alone (the baseline) against
   the full ``once()`` (read + detect + JSON).

lossguard is called through its public entry points only: ``DetectorSuite.observe`` sample by
sample on the synthetic curves, given the references a callback reads at train begin (ln V, the
label tokens' unigram entropy: ``Curve.references``), as the callback does; ``analysis.analyze``
on the real logs (what ``lossguard watch`` does: no references beyond what the log's keys say).
Whatever they do when this runs is what is measured.

**Alarms are lossguard's warning and critical findings**, the ones that can start a recovery.
Its info findings (a shape-only plateau, a non-finite grad norm under a finite loss) are advice;
they are scored on a line of their own under each table, never as alarms. ``--misses`` lists,
per run of the dev split only, what lossguard missed and where it raised a false alarm.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lossguard.records import Finding, Reason, Severity
from lossguard.testing.peers import Alarm, PeerSpec, replay, standard_peers
from lossguard.testing.scoring import LabelledRun, Tally, score_run
from lossguard.testing.synthetic import PLATEAU_KINDS, SCORED, Curve, Score, score, standard_set

TARGET_RECALL = {Reason.SPIKE: 0.95, Reason.DIVERGENCE: 0.95, Reason.NONFINITE: 0.95, Reason.EARLY_CONVERGENCE: 0.9}
COMPARED = (Reason.EARLY_CONVERGENCE, Reason.SPIKE, Reason.DIVERGENCE, Reason.NONFINITE, Reason.ZERO_LOSS)
LOSSGUARD = "**lossguard**"
ACTING = Severity.WARNING.rank  # a finding at this severity or above is an alarm (it can start a recovery)

SEED_SETS = (0, 77_000, 155_000)  # independent curve sets: a detector tuned on one must hold on all


@dataclass
class RunResult:
    """One labelled run, its logged values, lossguard's findings on it and every peer's alarms."""

    run: LabelledRun
    group: str  # "seed set 0", "dev", ...: what may be tuned on
    findings: list[Finding]
    steps: np.ndarray
    losses: np.ndarray
    grad_norms: np.ndarray
    has_grad_norm: np.ndarray
    expected_values: int  # how many values the run will log, as a rule knows it up front
    peers: dict[str, list[Alarm]] = field(default_factory=dict)

    def replay(self, spec: PeerSpec) -> list[Alarm]:
        finite = self.losses[np.isfinite(self.losses)]
        first = float(finite[0]) if len(finite) else float("nan")
        return replay(spec.build(self.expected_values, first), self.steps, self.losses, self.grad_norms,
                      self.has_grad_norm)

    def run_peers(self, specs: list[PeerSpec]) -> RunResult:
        for spec in specs:
            self.peers[spec.label] = self.replay(spec)
        return self


def quality(healthy: int, per_anomaly: int, seed_sets: tuple[int, ...] = SEED_SETS,
            results: list[RunResult] | None = None) -> bool:
    ok = True
    t0 = time.perf_counter()
    t_peers = 0.0
    all_parts: list[dict[Reason, Score]] = []
    per_set = []
    by_kind: dict[tuple[str, int], list[int]] = {}  # (plateau kind, interval) -> latencies
    for base in seed_sets:
        parts = []
        for k in (1, 10, 20):
            curves = standard_set(healthy=healthy, per_anomaly=per_anomaly, log_every=(k,), seed=1000 * k + base)
            print(f"\nseed set {base}, logging every {k} step(s): {len(curves)} curves, "
                  f"{sum(len(c.samples) for c in curves)} samples")
            every = [_detect_online(c) for c in curves]
            found = [_acting(f) for f in every]
            if results is not None:
                t1 = time.perf_counter()
                results.extend(_synthetic_result(c, f, f"seed set {base}") for c, f in zip(curves, every))
                t_peers += time.perf_counter() - t1
            kinds: dict[str, list[int]] = {}
            for i, c in enumerate(curves):
                kinds.setdefault(c.kind, []).append(i)
            scored = {kind: score([curves[i] for i in idx], findings=[found[i] for i in idx])
                      for kind, idx in kinds.items()}  # each curve once
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
    print(f"  early_convergence median latency: {ec.median_latency:.0f} steps (issue 17 accepts ~120 on per-step logs)")
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
    print(f"  quality evaluation took {time.perf_counter() - t0:.1f} s ({t_peers:.1f} s of it the peers)")
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


def _synthetic_result(curve: Curve, findings: list[Finding], group: str) -> RunResult:
    run = LabelledRun(name=f"{curve.kind}/{curve.log_every}", labels=tuple(curve.labels), healthy=curve.healthy,
                      log_every=curve.log_every, max_steps=curve.max_steps)
    n = len(curve.samples)
    return RunResult(run, group, findings, np.array([s.step for s in curve.samples]),
                     np.array([s.loss for s in curve.samples], dtype=float),
                     np.array([s.grad_norm for s in curve.samples], dtype=float), np.ones(n, bool),
                     curve.max_steps // curve.log_every).run_peers(standard_peers())


def tune(results: list[RunResult], group: str) -> list[PeerSpec]:
    """Each peer with a knob, set to the grid value with the best F1 (then the fewest healthy
    runs alarmed) on the runs of ``group``: the best a user of that rule could have done."""
    tuned = []
    for spec in standard_peers():
        if not spec.grid:
            continue
        t0 = time.perf_counter()
        best: tuple[float, float, float] | None = None
        for value in spec.grid:
            trial = spec.at(value, "")
            f1s, alarmed = [], 0
            for reason in spec.shown_for:
                t = Tally(reason)
                for r in results:
                    if r.group == group:
                        score_run(t, r.run, r.replay(trial))
                f1s.append(0.0 if t.f1 != t.f1 else t.f1)
                alarmed += t.healthy_runs_alarmed
            key = (float(np.mean(f1s)), -float(alarmed), float(value))
            if best is None or key[:2] > best[:2]:
                best = key
        assert best is not None
        tuned.append(spec.at(best[2], f"best F1 on {group}"))
        print(f"  tuned {spec.name} ({spec.knob}) in {time.perf_counter() - t0:.1f} s: {best[2]:g}, F1 {best[0]:.3f}")
    return tuned


def _acting(findings: list[Finding]) -> list[Finding]:
    """The findings that are alarms: warning or critical (an info finding is advice; recovery
    ignores it)."""
    return [f for f in findings if f.severity.rank >= ACTING]


def _lossguard_alarms(findings: list[Finding], info: bool = False) -> list[Alarm]:
    """lossguard's alarms (warning or worse), or with ``info`` its info findings alone."""
    return [Alarm(f.step, frozenset({f.reason}), f.severity.value) for f in findings
            if (f.severity.rank < ACTING) == info]


def _detect_online(curve: Curve) -> list[Finding]:
    """Every finding the suite makes on ``curve`` fed sample by sample as the callback feeds it,
    given the references a callback reads at train begin (ln V from the vocabulary, the label
    tokens' unigram entropy; a cross-entropy objective): ``Curve.references``."""
    from lossguard.signals.references import Objective, References
    from lossguard.signals.suite import DetectorSuite

    suite = DetectorSuite(max_steps=curve.max_steps)
    refs = curve.references
    suite.set_references(References(uniform=refs.get("uniform"), unigram=refs.get("unigram"),
                                    objective=Objective.CROSS_ENTROPY,
                                    sources={"uniform": "synthetic", "unigram": "synthetic"}))
    found: list[Finding] = []
    for s in curve.samples:
        found.extend(suite.observe(s))
    return found


def _nan0(v: float) -> float:
    return 0.0 if v != v else v


def compare(results: list[RunResult], title: str, specs: list[PeerSpec]) -> dict[Reason, dict[str, Tally]]:
    """One table per reason: lossguard and each peer that speaks to it, scored alike.

    lossguard's row counts its warning and critical findings only (what can start a recovery);
    its info findings are advice and are reported on a line of their own under the table."""
    print(f"\n### Peers side by side: {title}\n")
    print(f"{len(results)} runs, {sum(r.run.healthy for r in results)} healthy; "
          + ", ".join(f"{sum(1 for r in results for lr, _ in r.run.labels if lr == reason)} {reason.value}"
                      for reason in COMPARED))
    out: dict[Reason, dict[str, Tally]] = {}
    for reason in COMPARED:
        rows: dict[str, Tally] = {}
        t = Tally(reason)
        info = Tally(reason)
        for r in results:
            score_run(t, r.run, _lossguard_alarms(r.findings))
            score_run(info, r.run, _lossguard_alarms(r.findings, info=True))
        rows[LOSSGUARD] = t
        for spec in specs:
            if reason in spec.shown_for:
                t = Tally(reason)
                for r in results:
                    score_run(t, r.run, r.peers[spec.label])
                rows[spec.label] = t
        out[reason] = rows
        n_labels = next(iter(rows.values())).labels
        print(f"\n**{reason.value}** ({n_labels} labelled runs)\n")
        print("| rule | precision | recall | F1 | false alarms | healthy runs alarmed | median latency (steps) |")
        print("|---|---|---|---|---|---|---|")
        for name, t in rows.items():
            print(f"| {name} | {_f(t.precision)} | {_f(t.recall)} ({t.detected}/{t.labels}) | {_f(t.f1)} | "
                  f"{t.false_alarms} | {t.healthy_runs_alarmed}/{t.healthy_runs} | {_f(t.median_latency, 0)} |")
        n_info = sum(1 for r in results if any(f.reason == reason and f.severity.rank < ACTING for f in r.findings))
        print(f"\nlossguard info findings ({reason.value}, advice, not alarms): {n_info} runs; "
              f"on {info.healthy_runs_alarmed}/{info.healthy_runs} healthy runs; "
              f"within the window of {info.detected}/{info.labels} labels")
        lg = rows[LOSSGUARD]
        verdicts = []
        for name, t in rows.items():
            if name == LOSSGUARD:
                continue
            beaten = _nan0(lg.f1) > _nan0(t.f1) and lg.healthy_runs_alarmed <= t.healthy_runs_alarmed
            verdicts.append(f"{name}: {'beaten' if beaten else 'NOT beaten'} "
                            f"(F1 {_f(lg.f1)} vs {_f(t.f1)}, healthy alarmed {lg.healthy_runs_alarmed} vs "
                            f"{t.healthy_runs_alarmed})")
        if verdicts:
            print("peers (higher F1 at no more healthy runs alarmed): " + "; ".join(verdicts))
        if reason is Reason.ZERO_LOSS:
            _any_alarm_line(results, specs)
    return out


def corpus_targets(results: list[RunResult], split: str) -> bool:
    """Issue 17's real-log targets on one split, lossguard's warning and critical findings only."""
    healthy = [r for r in results if r.run.healthy]
    bad = [r for r in healthy if any(f.reason in (Reason.EARLY_CONVERGENCE, Reason.DIVERGENCE)
                                     for f in _acting(r.findings))]
    share = len(bad) / len(healthy) if healthy else float("nan")
    ok = share <= 0.01
    print(f"\ntargets, {split} split (lossguard, warning or worse):")
    print(f"  false early_convergence or divergence on <= 1% of healthy runs: {len(bad)}/{len(healthy)} = "
          f"{100 * share:.1f}% {'OK' if ok else 'MISSED'}")
    for reason in (Reason.DIVERGENCE, Reason.NONFINITE, Reason.ZERO_LOSS, Reason.EARLY_CONVERGENCE):
        t = Tally(reason)
        for r in results:
            score_run(t, r.run, _lossguard_alarms(r.findings))
        if reason is Reason.EARLY_CONVERGENCE:
            print(f"  premature-plateau recall (reported, no target): {t.detected}/{t.labels} = {_f(t.recall)} "
                  "(offline: no references, so shape-only plateaus are info)")
            continue
        good = t.recall >= 0.9
        ok &= good
        print(f"  recall {reason.value} >= 0.9: {t.detected}/{t.labels} = {_f(t.recall)} {'OK' if good else 'MISSED'}")
    return ok


def misses(results: list[RunResult]) -> None:
    """Per run of the dev split: each label lossguard missed and each false alarm it raised, with
    every finding it made on that run (for a person to look at the values)."""
    print("\n### lossguard's misses and false alarms, per run (dev split only)\n")
    for r in results:
        acting = _lossguard_alarms(r.findings)
        lines = []
        for reason in COMPARED:
            t = Tally(reason)
            score_run(t, r.run, acting)
            if t.detected < t.labels:
                lines.append(f"missed {reason.value} (onset {[o for x, o in r.run.labels if x == reason]})")
            if t.false_alarms:
                lines.append(f"{t.false_alarms} false {reason.value}")
        if not lines:
            continue
        said = "; ".join(f"{f.severity.value} {f.reason.value}@{f.step} (onset {f.onset_step}, {f.detector})"
                         for f in r.findings) or "no findings"
        print(f"- {r.run.name} [{'healthy' if r.run.healthy else r.run.labels}] {', '.join(lines)}. Findings: {said}")


def _any_alarm_line(results: list[RunResult], specs: list[PeerSpec]) -> None:
    """No peer has a zero-loss rule; say what their alarms of any kind do on zero-loss runs."""
    from lossguard.testing.synthetic import max_latency

    parts = []
    for spec in specs:
        n = hit = 0
        for r in results:
            for reason, onset in r.run.labels:
                if reason is Reason.ZERO_LOSS:
                    n += 1
                    limit = max_latency(reason, r.run.log_every, r.run.max_steps)
                    hit += any(onset <= a.step <= onset + limit for a in r.peers[spec.label])
        if n and hit:
            parts.append(f"{spec.label} {hit}/{n}")
    if parts:
        print("\nNo peer has a zero-loss rule. Alarms of any kind within the window on zero-loss runs: "
              + "; ".join(parts) + ".")


def _detail(results: list[RunResult], specs: list[PeerSpec]) -> None:
    """Per curve kind: in how many runs each rule raised an alarm for a reason its row is shown for."""
    kinds: dict[str, list[RunResult]] = {}
    for r in results:
        kinds.setdefault(r.run.name.split("/")[0], []).append(r)
    names = [LOSSGUARD] + [sp.label for sp in specs]
    print("\nruns with an alarm, per curve kind (lossguard: a warning or critical finding of a compared reason)\n")
    print("| kind | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for kind, rs in kinds.items():
        cells = [sum(any(f.reason in COMPARED for f in _acting(r.findings)) for r in rs)]
        for sp in specs:
            cells.append(sum(any(a.reasons & sp.shown_for for a in r.peers[sp.label]) for r in rs))
        print(f"| {kind} ({len(rs)}) | " + " | ".join(str(c) for c in cells) + " |")


def _f(v: float, digits: int = 3) -> str:
    return "-" if v != v else f"{v:.{digits}f}"


def corpus(splits: tuple[str, ...], specs: list[PeerSpec], list_misses: bool = False) -> bool:
    """lossguard (``analyze``, what ``lossguard watch`` runs) and the peers on the real logs."""
    try:
        from lossguard.testing.corpus import load_corpus
    except ImportError:
        print("\ncorpus: lossguard.testing.corpus is not in this checkout; skipped")
        return True
    from lossguard.analysis import analyze
    from lossguard.telemetry.runlog import SampleColumns

    ok = True
    for split in splits:
        t0 = time.perf_counter()
        entries = load_corpus(split=split)
        results = []
        skipped = 0
        for e in entries:
            label = e.label.value
            if label == "unusable":
                skipped += 1
                continue
            log = e.log
            cols = log.columns if log.columns is not None else SampleColumns.from_samples(log.samples)
            keep = np.asarray(cols.has_loss, bool)
            steps = np.asarray(cols.steps)[keep]
            if len(steps) == 0:
                skipped += 1
                continue
            every = max(int(e.log_every or (np.median(np.diff(steps)) if len(steps) > 1 else 1)), 1)
            horizon = int(log.max_steps or steps[-1])
            labels = ()
            reason = _CORPUS_REASONS.get(label)
            if reason is not None and e.onset_step is not None:
                labels = ((reason, int(e.onset_step)),)
            run = LabelledRun(name=f"{e.id} {label}", labels=labels, healthy=e.label.is_healthy, log_every=every,
                              max_steps=horizon)
            expected = max(horizon // every if log.max_steps else len(steps), len(steps))
            results.append(RunResult(run, split, analyze(log).findings, steps,
                                     np.asarray(cols.loss, dtype=float)[keep],
                                     np.asarray(cols.grad_norm, dtype=float)[keep],
                                     np.asarray(cols.has_grad_norm, bool)[keep], expected).run_peers(specs))
        compare(results, f"real logs, {split} split ({skipped} unusable or empty left out; "
                         f"{time.perf_counter() - t0:.1f} s)", specs)
        good = corpus_targets(results, split)
        if split == "test":
            ok &= good
        if list_misses and split == "dev":  # never per run on test: nobody tunes on it
            misses(results)
    return ok


_CORPUS_REASONS = {
    "premature_plateau": Reason.EARLY_CONVERGENCE,
    "divergence": Reason.DIVERGENCE,
    "spike": Reason.SPIKE,
    "nonfinite": Reason.NONFINITE,
    "zero_loss": Reason.ZERO_LOSS,
}


def testbed(names: list[str] | None = None, curves_path: str | None = None) -> None:
    """Each testbed scenario as a real run with the callback attached (detection only)."""
    from datasets.utils.logging import disable_progress_bar

    from lossguard import GuardConfig, LossGuard
    from lossguard.testing.testbed.scenarios import SCENARIOS, run_scenario

    disable_progress_bar()  # TRL's dataset preparation for the DPO scenarios

    print("\n### Testbed scenarios: real Trainer runs on the pretrained testbed base, LossGuard attached "
          "(recovery off)\n")
    print("| scenario | expected | steps | wall (s) | outcome without lossguard | lossguard's findings |")
    print("|---|---|---|---|---|---|")
    dump = {}
    for name in names or list(SCENARIOS):
        sc = SCENARIOS[name]
        guard = LossGuard(GuardConfig(console=False, recovery={"enabled": False}))
        with tempfile.TemporaryDirectory() as out:
            r = run_scenario(name, out, callbacks=[guard])
        found = ", ".join(f"{f.reason.value}/{f.severity.value}@{f.step} (onset {f.onset_step})"
                          for f in guard.findings) or "none"
        print(f"| {name} | {sc.expected} | {r.steps[-1] if r.steps else 0} | {r.wall_s:.1f} | "
              f"{_outcome_text(r.outcome)} | {found} |")
        sys.stdout.flush()
        dump[name] = {"expected": sc.expected, "steps": r.steps, "loss": r.losses, "grad_norm": r.grad_norms,
                      "epoch": r.epochs, "outcome": r.outcome, "wall_s": round(r.wall_s, 2),
                      "findings": [f.to_record() for f in guard.findings]}
    print("\nfindings in full:")
    for name, d in dump.items():
        for f in d["findings"]:
            print(f"  {name}: {f['reason']}/{f['severity']} at {f['step']}: {f['message']}")
    if curves_path:
        Path(curves_path).write_text(json.dumps(dump, default=_json_float) + "\n", encoding="utf-8")
        print(f"curves written to {curves_path}")


def _json_float(v: Any) -> Any:
    return str(v)


def _outcome_text(o: dict[str, Any]) -> str:
    if "preference_accuracy" in o:
        return (f"held-out DPO loss {o['eval_loss_before']:.3f} -> {o['eval_loss_after']:.3f}, preference accuracy "
                f"{o['preference_accuracy_before']:.2f} -> {o['preference_accuracy']:.2f}, "
                f"reward margin {o['reward_margin']:+.2f}")
    parts = [f"answer loss {o['eval_loss_before']:.2f} -> {o['eval_loss_after']:.2f}"]
    if "prior_entropy" in o:
        parts.append(f"accuracy {o['accuracy']:.2f} (majority {o['majority_share']:.2f}), "
                     f"prior entropy {o['prior_entropy']:.3f}")
    if "culprit_steps" in o:
        parts.append("culprit batches at steps " + ", ".join(str(s) for s in o["culprit_steps"]))
    if "first_nonfinite_step" in o:
        parts.append(f"first non-finite loss at step {o['first_nonfinite_step']}")
    return "; ".join(parts)


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
        suite.observe_many(cols)
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
    """Seconds in each detector's batch path over the whole log (the suite's order)."""
    out = {}
    for det in suite.detectors:
        t0 = time.perf_counter()
        det.update_many(cols)
        out[det.name] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer curves")
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--no-corpus", action="store_true", help="leave out the real logs")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--detail", action="store_true", help="per curve kind: who alarmed (synthetic)")
    ap.add_argument("--misses", action="store_true",
                    help="list lossguard's misses and false alarms per run of the dev split (never test)")
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--no-testbed", action="store_true", help="leave out the testbed's real runs")
    ap.add_argument("--testbed-only", action="store_true", help="only the testbed's real runs")
    ap.add_argument("--scenarios", nargs="+", default=None, help="testbed scenarios to run (default: all)")
    ap.add_argument("--testbed-curves", default=None, help="write the testbed runs' curves to this JSON file")
    args = ap.parse_args()
    ok = True
    if args.testbed_only:
        testbed(args.scenarios, args.testbed_curves)
        return 0
    if not args.throughput_only:
        results: list[RunResult] = []
        ok = quality(20 if args.quick else 50, 8 if args.quick else 20, SEED_SETS[:1] if args.quick else SEED_SETS,
                     results)
        t0 = time.perf_counter()
        tuned = tune(results, f"seed set {SEED_SETS[0]}")
        for r in results:
            r.run_peers(tuned)
        print(f"\npeers with a knob tuned on seed set {SEED_SETS[0]} in {time.perf_counter() - t0:.1f} s: "
              + "; ".join(t.label for t in tuned))
        specs = standard_peers() + tuned
        specs.sort(key=lambda sp: [p.name for p in standard_peers()].index(sp.name))
        compare(results, "synthetic curves (" + ("seed set 0 only, --quick" if args.quick
                                                  else f"{len(SEED_SETS)} seed sets") + ", every 1, 10 and 20 steps)",
                specs)
        if args.detail:
            _detail(results, specs)
        if not args.no_corpus:
            ok &= corpus(("dev", "test"), specs, args.misses)
        if not args.no_testbed:
            testbed(args.scenarios, args.testbed_curves)
    if not args.no_throughput:
        throughput(args.samples)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
