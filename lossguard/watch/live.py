"""A run as the watcher knows it so far: bounded summary of the log plus the detectors' findings.

``LiveRun.fold`` takes each ``Batch`` the follower hands out, runs every new sample through the
same ``DetectorSuite`` the training callback uses (so a watched run reports what the callback
would have seen, whatever wrote the log) and keeps only what the dashboard and the report draw:
curves thinned with min/max buckets, the latest records, the findings and actions. Memory does
not grow with the length of the run beyond the findings, actions and probes themselves.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lossguard.config import DetectionConfig
from lossguard.numbers import as_float
from lossguard.records import Action, ActionKind, Finding, Sample, as_step
from lossguard.signals.references import References
from lossguard.status import RunStatus, StatusVerdict, run_status
from lossguard.watch.downsample import MinMaxBuckets
from lossguard.watch.follow import Batch

logger = logging.getLogger("lossguard")

SMOOTHING_SPAN = 20
MAX_KEPT = 10_000


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _run_config(run: dict[str, Any] | None) -> DetectionConfig | None:
    """The detection thresholds the run was trained with, when its run record carries them."""
    if not run or not isinstance(run.get("config"), dict):
        return None
    try:
        from lossguard.analysis import _config_from_run
    except ImportError:
        return None
    return _config_from_run(run["config"])


class LiveRun:
    """Everything the dashboard, the report and the daemon's alerts read about one run."""

    def __init__(self, run_dir: str | Path, *, config: DetectionConfig | None = None,
                 capacity: int = 2000, clock: Callable[[], float] = time.time) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.capacity = capacity
        self._clock = clock
        self.notes: deque[str] = deque(maxlen=20)
        self.source_kind: str | None = None
        self.source_path: Path | None = None
        self.waiting: str | None = None
        self.resets = 0
        self.detector_error: str | None = None
        self.bad_lines = 0
        self.clear()

    def clear(self) -> None:
        """Forget the run (its log was truncated or replaced): the next batch starts afresh."""
        self.run: dict[str, Any] | None = None
        self.preflight: dict[str, Any] | None = None
        self.references: dict[str, Any] | None = None
        self.max_steps: int | None = None
        self.num_train_epochs: float | None = None
        self.ended = False
        self.n_samples = 0
        self.first_step: int | None = None
        self.last: Sample | None = None
        self.recent: deque[Sample] = deque(maxlen=512)
        self.loss = MinMaxBuckets(self.capacity)
        self.loss_smooth = MinMaxBuckets(self.capacity)
        self.grad_norm = MinMaxBuckets(self.capacity)
        self.lr = MinMaxBuckets(self.capacity)
        self._ema = 0.0
        self._ema_weight = 0.0
        self.smoothed: float | None = None
        self.findings: list[Finding] = []
        self._finding_keys: dict[tuple[str, int], int] = {}
        self.actions: list[Action] = []
        self.probes: list[dict[str, Any]] = []
        self.gpu_last: dict[str, Any] | None = None
        self.gpu_util: dict[int, MinMaxBuckets] = {}
        self.evals: list[dict[str, Any]] = []
        self.updated_at: float | None = None
        self._suite: Any = None

    # ---- folding ---------------------------------------------------------------------------
    def fold(self, batch: Batch) -> list[Finding]:
        """Take in one poll's worth of log; returns the findings that are new with it."""
        if batch.reset:
            self.clear()
            self.resets += 1
        for note in batch.notes:
            self.notes.append(note)
        self.waiting = batch.waiting
        if batch.source is not None:
            self.source_kind, self.source_path = batch.source.kind, batch.source.path
        if batch.max_steps and batch.max_steps != self.max_steps:
            self.max_steps = batch.max_steps
            self._tell_progress()
        if batch.num_train_epochs is not None and batch.num_train_epochs != self.num_train_epochs:
            self.num_train_epochs = batch.num_train_epochs
            self._tell_progress()
        if batch.samples or batch.records:
            self.updated_at = self._clock()
        new: list[Finding] = []
        bounds = [(0, 0, None), *batch.cuts, (len(batch.samples), len(batch.records), None)]
        for (s0, r0, start), (s1, r1, _) in zip(bounds, bounds[1:]):
            if start is not None:
                self._cut_after(start, new)
            self._fold_part(batch.samples[s0:s1], batch.records[r0:r1], new)
        return new

    def _fold_part(self, samples: list[Sample], records: list[dict[str, Any]], new: list[Finding]) -> None:
        later: list[dict[str, Any]] = []
        for rec in records:
            kind = rec.get("kind")
            if kind == "run":
                self._take_run(rec)
            elif kind == "preflight":
                self.preflight = rec
            elif kind == "references":
                self.references = rec
                self._tell_references()
            else:
                if kind == "eval":
                    self._tell_eval(rec)
                later.append(rec)
        for s in samples:
            self._take_sample(s, new)
        for rec in later:
            self._take_record(rec, new)

    def _cut_after(self, step: int, new: list[Finding]) -> None:
        """A run resumed at ``step`` starts here: the findings, actions and probes past ``step``
        so far are the abandoned branch's (a run killed after its last checkpoint), and go. The
        detectors start afresh: they had seen that branch's samples."""
        if self.last is None or self.last.step <= step:
            return
        self.findings = [f for f in self.findings if f.step <= step]
        self._finding_keys = {(f.reason.value, f.onset_step): i for i, f in enumerate(self.findings)}
        new[:] = [f for f in new if f.step <= step]
        self.actions = [a for a in self.actions if a.step <= step]
        self.probes = [r for r in self.probes if (as_step(r.get("step")) or 0) <= step]
        self.evals = [r for r in self.evals if (as_step(r.get("step")) or 0) <= step]
        self.recent = deque((s for s in self.recent if s.step <= step), maxlen=self.recent.maxlen)
        self._suite = None

    def _tell_progress(self) -> None:
        setter = getattr(self._suite, "set_progress", None)
        if setter is not None:
            setter(max_steps=self.max_steps, num_train_epochs=self.num_train_epochs)

    def _tell_references(self) -> None:
        setter = getattr(self._suite, "set_references", None)
        if setter is not None and self.references is not None:
            setter(References.from_dict(self.references))

    def _tell_eval(self, rec: dict[str, Any]) -> None:
        step, loss = as_step(rec.get("step")), as_float(rec.get("eval_loss"), finite=True)
        hook = getattr(self._suite, "observe_eval", None)
        if hook is not None and step is not None and loss is not None:
            hook(step, loss)

    def _take_run(self, rec: dict[str, Any]) -> None:
        self.run = rec
        self.ended = False
        ms = as_step(rec.get("max_steps"))
        if ms:
            self.max_steps = ms
        ne = as_float(rec.get("num_train_epochs"))
        if ne is not None:
            self.num_train_epochs = ne
        self._tell_progress()

    def _take_sample(self, s: Sample, new: list[Finding]) -> None:
        self.n_samples += 1
        if self.first_step is None:
            self.first_step = s.step
        self.last = s
        self.recent.append(s)
        x = float(s.step)
        self.loss.add(x, s.loss)
        if _finite(s.loss):
            alpha = 2.0 / (SMOOTHING_SPAN + 1)
            self._ema = (1 - alpha) * self._ema + alpha * s.loss  # type: ignore[operator]
            self._ema_weight = (1 - alpha) * self._ema_weight + alpha
            self.smoothed = self._ema / self._ema_weight
            self.loss_smooth.add(x, self.smoothed)
        self.grad_norm.add(x, s.grad_norm)
        self.lr.add(x, s.lr)
        for f in self._detect(s):
            self._add_finding(f, new)

    def _detect(self, s: Sample) -> list[Finding]:
        if self.detector_error is not None:
            return []
        try:
            if self._suite is None:
                from lossguard.signals.suite import DetectorSuite

                self._suite = DetectorSuite(self.config or _run_config(self.run), max_steps=self.max_steps,
                                            num_train_epochs=self.num_train_epochs)
                self._tell_references()
                for rec in self.evals:
                    self._tell_eval(rec)
            return list(self._suite.observe(s))
        except Exception as err:  # a detector bug must not take the watcher down
            self.detector_error = f"detectors unavailable ({type(err).__name__}: {err}); showing logged findings only"
            self.notes.append(self.detector_error)
            logger.warning("lossguard: %s", self.detector_error)
            return []

    def _add_finding(self, f: Finding, new: list[Finding], *, recorded: bool = False) -> None:
        # same identity as ``analysis.analyze``: (reason, onset); the copy recorded during
        # training wins, since its message is what the person saw then
        key = (f.reason.value, f.onset_step)
        at = self._finding_keys.get(key)
        if at is not None:
            if recorded and at >= 0:
                self.findings[at] = f
            return
        if len(self.findings) < MAX_KEPT:
            self._finding_keys[key] = len(self.findings)
            self.findings.append(f)
        else:
            self._finding_keys[key] = -1
        new.append(f)

    def _take_record(self, rec: dict[str, Any], new: list[Finding]) -> None:
        kind = rec.get("kind")
        try:
            if kind == "finding":
                self._add_finding(Finding.from_record(rec), new, recorded=True)
            elif kind == "action":
                if len(self.actions) < MAX_KEPT:
                    self.actions.append(Action.from_record(rec))
            elif kind == "probe":
                if len(self.probes) < MAX_KEPT:
                    self.probes.append(rec)
            elif kind == "gpu":
                self._take_gpu(rec)
            elif kind == "eval":
                if len(self.evals) < MAX_KEPT:
                    self.evals.append(rec)
            elif kind == "end":
                self.ended = True
        except (TypeError, ValueError, KeyError, AttributeError):
            pass  # one malformed record must not hide the rest of the run

    def _take_gpu(self, rec: dict[str, Any]) -> None:
        gpus = rec.get("gpus")
        if not isinstance(gpus, list):
            return
        self.gpu_last = rec
        x = as_float(rec.get("step"))
        if x is None:
            x = as_float(rec.get("t"))
        if x is None:
            return
        for i, g in enumerate(gpus):
            if not isinstance(g, dict):
                continue
            idx = as_float(g.get("index"))
            key = int(idx) if idx is not None and math.isfinite(idx) else i
            util = as_float(g.get("util_mean"))
            self.gpu_util.setdefault(key, MinMaxBuckets(self.capacity)).add(x, util)

    # ---- what the views read ----------------------------------------------------------------
    def verdict(self) -> StatusVerdict:
        """The run's status, what was handled and what is open (the same rule as ``watch --once``).

        Only lossguard's own log says when training ended; other logs are not called unfinished.
        """
        return run_status(self.findings, self.actions, self.n_samples,
                          last_step=None if self.last is None else self.last.step, max_steps=self.max_steps,
                          num_train_epochs=self.num_train_epochs,
                          ended=self.ended or self.source_kind not in (None, "lossguard"))

    @property
    def status(self) -> RunStatus:
        """``no_data``, ``healthy``, ``recovered``, ``warning`` or ``critical`` (``lossguard.status``)."""
        return self.verdict().status

    def seconds_per_step(self) -> float | None:
        """Median recent seconds per optimizer step, from step times or record timestamps."""
        times = sorted(s.step_time_s for s in self.recent if _finite(s.step_time_s) and s.step_time_s > 0)  # type: ignore[operator]
        if len(times) >= 3:
            return times[len(times) // 2]
        rates: list[float] = []
        prev: Sample | None = None
        for s in self.recent:
            if prev is not None and _finite(s.t) and _finite(prev.t) and s.step > prev.step:
                rates.append((s.t - prev.t) / (s.step - prev.step))  # type: ignore[operator]
            prev = s
        rates.sort()
        return rates[len(rates) // 2] if len(rates) >= 3 else None

    def eta_seconds(self) -> float | None:
        """Seconds until ``max_steps`` at the recent pace (None when either is unknown)."""
        if self.last is None or not self.max_steps or self.ended:
            return None
        per = self.seconds_per_step()
        if per is None:
            return None
        return max(0, self.max_steps - self.last.step) * per

    def lr_phases(self) -> list[tuple[int, int | None, float | None]]:
        """Spans where lossguard ran at a reduced LR: (start step, end step or None, factor)."""
        phases: list[tuple[int, int | None, float | None]] = []
        open_at: tuple[int, float | None] | None = None
        for a in self.actions:
            if a.action is ActionKind.LR_OVERRIDE:
                if open_at is not None:
                    phases.append((open_at[0], a.step, open_at[1]))
                open_at = (a.step, a.lr_factor)
            elif a.action in (ActionKind.LR_RESTORE, ActionKind.GIVE_UP, ActionKind.REVERT) and open_at is not None:
                phases.append((open_at[0], a.step, open_at[1]))
                open_at = None
        if open_at is not None:
            phases.append((open_at[0], None, open_at[1]))
        return phases


def read_run(run_dir: str | Path, *, config: DetectionConfig | None = None,
             on_batch: Callable[[Batch], None] | None = None) -> LiveRun:
    """Read a run directory's log to its current end, running the detectors over it.

    Raises:
        LogReadError: the directory is missing, holds no log lossguard can read, or several runs.
    """
    from lossguard.errors import LogReadError
    from lossguard.watch.follow import LOOKED_FOR, RunFollower

    follower = RunFollower(run_dir)
    live = LiveRun(follower.run_dir, config=config)
    while True:
        batch = follower.poll()
        if batch.source is None:
            raise LogReadError(f"{follower.run_dir}: no training log found (looked for {LOOKED_FOR})")
        live.fold(batch)
        if on_batch is not None:
            on_batch(batch)
        if not batch.behind:
            break
    if live.n_samples == 0 and follower.last_error is not None:
        raise follower.last_error
    if live.n_samples == 0 and follower.bad_lines and follower.source is not None:
        raise LogReadError(f"{follower.source.path}: not a readable log ({follower.bad_lines} unreadable line(s), no sample)")
    if live.n_samples == 0 and follower.only_unfinished_line and follower.source is not None:
        # what ``watch --once`` says of the same file: one read at one moment has nothing to show
        raise LogReadError(f"{follower.source.path}: not a readable log (1 unreadable line(s), no sample)")
    live.bad_lines = follower.bad_lines
    return live
