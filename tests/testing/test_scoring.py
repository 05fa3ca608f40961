"""Scoring alarms against labels: each alarm's fate, worked by hand."""

from __future__ import annotations

import math

import pytest

from lossguard.records import Reason
from lossguard.testing.peers import Alarm
from lossguard.testing.scoring import LabelledRun, Tally, tally

EC, SPIKE, DIV = Reason.EARLY_CONVERGENCE, Reason.SPIKE, Reason.DIVERGENCE


def _a(step, *reasons):
    return Alarm(step, frozenset(reasons), "test")


def _run(name, labels=(), healthy=False, every=10, steps=1000):
    return LabelledRun(name, tuple(labels), healthy, every, steps)


def test_each_alarm_is_detected_repeated_redundant_excused_or_false():
    plateau = _run("plateau", [(EC, 100)])  # a plateau's window is half the run: 100..600
    runs = [
        (plateau, [_a(50, EC), _a(150, EC), _a(160, EC), _a(300, EC), _a(700, EC)]),
        (_run("healthy", healthy=True), [_a(20, EC), _a(400, EC)]),
        (_run("healthy, quiet", healthy=True), []),
        (_run("diverges", [(DIV, 200)]), [_a(250, EC), _a(120, EC)]),
    ]
    t = tally(EC, runs)
    assert (t.labels, t.detected, t.latencies) == (1, 1, [50])
    assert t.repeats == 1  # 160 follows 150 at the next logged value
    assert t.redundant == 1  # 300: the same plateau again
    assert t.excused == 1  # 250: after the divergence began
    assert t.false_alarms == 5  # 50 (before the onset), 700 (past the window), 20, 400, 120
    assert (t.healthy_runs, t.healthy_runs_alarmed, t.healthy_alarms) == (2, 1, 2)
    assert t.precision == pytest.approx(1 / 6) and t.recall == 1.0
    assert t.f1 == pytest.approx(2 * (1 / 6) / (1 / 6 + 1))


def test_an_alarm_for_two_reasons_is_excused_where_it_found_the_other():
    spike = _run("spike", [(SPIKE, 300)])  # a spike's window: 3 intervals + 5 steps
    runs = [(spike, [_a(302, SPIKE, DIV)])]
    s, d = tally(SPIKE, runs), tally(DIV, runs)
    assert (s.detected, s.false_alarms) == (1, 0)
    assert (d.detected, d.false_alarms, d.excused) == (0, 0, 1)
    late = [(spike, [_a(400, SPIKE, DIV)])]
    assert tally(DIV, late).false_alarms == 1 and tally(SPIKE, late).false_alarms == 1


def test_empty_tallies_say_nan_not_zero():
    t = Tally(EC)
    assert math.isnan(t.precision) and math.isnan(t.recall) and math.isnan(t.f1)
    t.add(tally(EC, [(_run("p", [(EC, 0)]), [])]))
    assert t.recall == 0.0 and math.isnan(t.precision)
