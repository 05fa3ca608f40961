"""The one lenient number reader and the one message number format."""

import math

import numpy as np

from lossguard.numbers import MAX_STEP, as_float, as_int, as_step, fmt


def test_as_float_reads_what_logs_and_configs_hold_and_nothing_else():
    assert as_float(1.5) == 1.5 and as_float(3) == 3.0 and as_float(" 2.5 ") == 2.5
    assert as_float(np.float32(0.25)) == 0.25 and as_float(np.int64(7)) == 7.0
    assert math.isnan(as_float("nan")) and as_float("inf") == math.inf and as_float("-inf") == -math.inf
    assert as_float(10**400) == math.inf and as_float(-(10**400)) == -math.inf
    assert [as_float(v) for v in (None, True, False, "nope", [1.0], {"a": 1})] == [None] * 6
    assert as_float(math.nan, finite=True) is None and as_float("inf", finite=True) is None
    assert as_float(2.0, finite=True) == 2.0


def test_as_int_and_as_step_cut_fractions_and_refuse_what_no_column_can_hold():
    assert as_int(3.9) == 3 and as_int(-3.9) == -3 and as_int("12") == 12
    assert as_int(2.0**63) is None and as_int(math.inf) is None and as_int(True) is None
    assert as_int(5, 0, 4) is None and as_int(4, 0, 4) == 4
    assert as_step(7) == 7 and as_step(7.5) == 7 and as_step("7") == 7
    assert as_step(-1) is None and as_step(MAX_STEP + 1) is None and as_step(MAX_STEP) == MAX_STEP
    assert as_step(True) is None and as_step(math.nan) is None and as_step(None) is None


def test_fmt_shows_four_significant_digits_and_three_with_an_exponent():
    assert fmt(2.34567) == "2.346" and fmt(0.25) == "0.25" and fmt(0.0) == "0" and fmt(123456.0) == "1.235e+05"
    assert fmt(1.23456e-5) == "1.23e-05" and fmt(2.5e7) == "2.5e+07"
    assert fmt(math.nan) == "nan" and fmt(-math.inf) == "-inf"
    assert fmt(None) == "-" and fmt(None, missing="n/a") == "n/a"
