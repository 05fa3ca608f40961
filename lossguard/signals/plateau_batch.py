"""The plateau detector's batch path (``PlateauDetector.update_many``): the same decisions as its
streaming ``update``, over arrays, and fast on long logs.

Past ``early_fraction`` of a run of known length nothing can fire any more, so the rest of the
log only gets the bookkeeping, vectorised. Before that, only the values at a check (and at an LR
rise) need the full ``_update``; the values between two of them update the books a stretch at
a time (``Stretches`` finds the stops with a search each), when the steps never go back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from lossguard.records import Columns, Finding

if TYPE_CHECKING:
    from lossguard.signals.plateau import PlateauDetector

_CHUNK = 65_536  # values converted to Python floats at a time
_MIN_STRETCH = 16  # shorter stretches between checks are cheaper one value at a time


def update_many(det: PlateauDetector, columns: Columns) -> list[tuple[int, Finding]]:
    """``det.update`` over a stretch of steps; (row, finding) pairs, same results."""
    steps, losses, lrs, epochs = columns.steps, columns.loss, columns.lr, columns.epoch
    out: list[tuple[int, Finding]] = []
    ef = det.config.early_fraction
    for lo_i in range(0, len(steps), _CHUNK):
        hi_i = lo_i + _CHUNK
        arrs = (steps[lo_i:hi_i], losses[lo_i:hi_i], lrs[lo_i:hi_i], epochs[lo_i:hi_i])
        st, lo, lr, ep = lists = tuple(a.tolist() for a in arrs)
        plan = _stretches(det, *arrs, lists)
        j, n = 0, len(st)
        while j < n:
            if plan is not None and det.seg_start is not None:
                stop = plan.stop(j, det)
                if stop - j >= _MIN_STRETCH:
                    _bookkeep(det, plan, j, stop)
                    j = stop
                    continue
            loss = lo[j]
            if not math.isfinite(loss):
                j += 1
                continue
            r, e = lr[j], ep[j]
            r = None if r != r else r
            e = None if e != e else e
            f = det._update(st[j], loss, r, e)
            if f is not None:
                out.append((lo_i + j, f))
            if det.max_steps and not det.active and st[j] / det.max_steps > ef:
                i = lo_i + j + 1
                track_many(det, steps[i:], losses[i:], lrs[i:], epochs[i:])
                return out
            j += 1
    return out


def _stretches(det: PlateauDetector, steps: np.ndarray, losses: np.ndarray, lrs: np.ndarray, epochs: np.ndarray,
               lists: tuple[list[Any], ...]) -> Stretches | None:
    """Where in this chunk a value needs more than bookkeeping (None: every value does)."""
    if (not det.max_steps or len(steps) < _MIN_STRETCH or steps.dtype.kind not in "iu"
            or np.any(steps[1:] < steps[:-1]) or not np.isfinite(losses).any()):
        return None
    return Stretches(det, steps, losses, lrs, epochs, lists)


def _bookkeep(det: PlateauDetector, plan: Stretches, a: int, b: int) -> None:
    """``_update`` of values ``a:b`` of the chunk, none of which is checked, rises the LR or
    lies past ``early_fraction`` (unless a plateau is being reported): the books only."""
    if not plan.track(det, a, b):
        return
    fin = plan.finite[a:b]
    every = bool(fin.all())
    pick = slice(a, b) if every else np.flatnonzero(fin) + a
    s, v = plan.steps[pick], plan.losses[pick]
    det.bins.push_many(s, v)
    if not det.stall_shared:
        det.stall_bins.push_many(s, v)
    st, lo = plan.st, plan.lo
    if every:
        first = max(a, b - det.recent.maxlen)  # the deque keeps no more
        det.recent.extend(zip(st[first:b], lo[first:b]))
    else:
        det.recent.extend((st[k], lo[k]) for k in range(a, b) if fin[k - a])


def track_many(det: PlateauDetector, steps: np.ndarray, losses: np.ndarray, lrs: np.ndarray, epochs: np.ndarray) -> None:
    """``_track`` over arrays (finite losses only count), with a loop only over LR rises."""
    keep = np.isfinite(losses)
    st, lr, ep = steps[keep].astype(np.int64), lrs[keep], epochs[keep]
    if len(st) == 0:
        return
    prev = np.concatenate([[det.last_step if det.last_step is not None else st[0]], st[:-1]])
    up = np.flatnonzero(st > prev)
    if len(up) and not (det.last_step is None and up[-1] == 0):
        det.gap = int(st[up[-1]] - prev[up[-1]])
    det.last_step = int(st[-1])
    with np.errstate(invalid="ignore"):
        pos = np.flatnonzero(ep > 0)
    if len(pos):
        j = int(pos[-1])
        det.epoch = float(ep[j])
        pos_st = pos[st[pos] > 0]
        if len(pos_st):
            k = int(pos_st[-1])
            det.steps_per_epoch = float(st[k]) / float(ep[k])
    has = np.flatnonzero(~np.isnan(lr))
    if len(has):
        v = lr[has]
        before = np.concatenate([[det.last_lr if det.last_lr is not None else np.nan], v[:-1]])
        with np.errstate(invalid="ignore"):
            rise = v > before * (1.0 + 1e-9)
            fall = ~rise & (v < before * (1.0 - 1e-9))
        fell = np.cumsum(fall)  # LR falls up to and including each value
        seen = 0  # falls counted at the last restart
        for r in np.flatnonzero(rise):
            if fell[r] > seen:
                det.lr_fell = True
            det._restart(int(st[has[r]]), warmup=not det.lr_fell)
            seen = int(fell[r])
        if fell[-1] > seen:
            det.lr_fell = True
        det.last_lr = float(v[-1])


class Stretches:
    """One chunk of the batch path's values, and where in it a value needs the full ``_update``:
    an LR rise, the first value past ``early_fraction`` and the next check. Between them a
    stretch of values only updates the books, which these index arrays give a search at a time.
    Only for steps that never go back (each stop is a search then)."""

    def __init__(self, det: PlateauDetector, steps: np.ndarray, losses: np.ndarray, lrs: np.ndarray,
                 epochs: np.ndarray, lists: tuple[list[Any], ...]) -> None:
        self.steps, self.losses = steps, losses
        self.st, self.lo, self.lr, self.ep = lists
        self.finite = np.isfinite(losses)
        self.fin = np.flatnonzero(self.finite)
        fs = steps[self.fin]
        prev = np.concatenate([[fs[0] if det.last_step is None else det.last_step], fs[:-1]])
        self.inc = self.fin[fs > prev]  # where ``_track`` sets the gap
        self.prev_step = det.last_step
        with np.errstate(invalid="ignore"):
            ep = epochs[self.fin]
            self.ep_pos = self.fin[ep > 0]
            self.spe_pos = self.fin[(ep > 0) & (fs > 0)]
            self.lr_pos = self.fin[~np.isnan(lrs[self.fin])]
            v = lrs[self.lr_pos]
            before = np.concatenate([[np.nan if det.last_lr is None else det.last_lr], v[:-1]])
            self.rises = self.lr_pos[v > before * (1.0 + 1e-9)]
            self.falls = self.lr_pos[v < before * (1.0 - 1e-9)]
        self.late = int(np.searchsorted(steps / det.max_steps > det.config.early_fraction, True))

    def stop(self, j: int, det: PlateauDetector) -> int:
        """The first value from ``j`` on that needs ``det``'s full ``_update``."""
        stop = max(j, int(np.searchsorted(self.steps, det.next_eval)))
        k = int(np.searchsorted(self.rises, j))
        if k < len(self.rises):
            stop = min(stop, int(self.rises[k]))
        if not det.active:
            stop = min(stop, max(j, self.late))
        return stop

    @staticmethod
    def _last(pos: np.ndarray, a: int, b: int) -> int:
        """The last of the sorted positions ``pos`` in ``a:b``, or -1."""
        k = int(np.searchsorted(pos, b)) - 1
        return int(pos[k]) if k >= 0 and pos[k] >= a else -1

    def track(self, det: PlateauDetector, a: int, b: int) -> bool:
        """``_track`` of values ``a:b`` (no LR rise among them); False when none is finite."""
        last = self._last(self.fin, a, b)
        if last < 0:
            return False
        st = self.st
        q = self._last(self.inc, a, b)
        if q >= 0:
            k = int(np.searchsorted(self.fin, q))
            det.gap = st[q] - (st[int(self.fin[k - 1])] if k > 0 else self.prev_step)
        det.last_step = st[last]
        e = self._last(self.ep_pos, a, b)
        if e >= 0:
            det.epoch = self.ep[e]
        e = self._last(self.spe_pos, a, b)
        if e >= 0:
            det.steps_per_epoch = st[e] / self.ep[e]
        r = self._last(self.lr_pos, a, b)
        if r >= 0:
            det.last_lr = self.lr[r]
            if self._last(self.falls, a, b) >= 0:
                det.lr_fell = True
        return True
