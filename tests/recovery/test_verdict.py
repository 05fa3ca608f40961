"""The judge's rule: paired per-unit differences, token-weighted, kept only above z standard errors."""

import math
import random
import subprocess
import sys

import pytest

from lossguard.recovery.verdict import Scores, judge, paired_gain


def _brute_force(head, branch):
    """The weighted mean difference and the ratio estimator's standard error, written out."""
    d = [h - b for h, b in zip(head.losses, branch.losses)]
    w = head.weights
    n, total = len(d), sum(w)
    mean = sum(x * y for x, y in zip(d, w)) / total
    resid = [y * (x - mean) for x, y in zip(d, w)]
    return mean, math.sqrt(n / (n - 1) * sum(r * r for r in resid)) / total


def test_the_gain_is_exactly_the_difference_of_the_token_weighted_scores():
    rng = random.Random(3)
    weights = [rng.randint(3, 40) for _ in range(50)]
    head = Scores.of([2.0 + rng.gauss(0, 0.3) for _ in weights], weights)
    branch = Scores.of([v - 0.05 + rng.gauss(0, 0.1) for v in head.losses], weights)
    gain, se, n = paired_gain(head, branch)
    assert n == 50
    assert gain == pytest.approx(head.mean - branch.mean, abs=1e-12)
    want_gain, want_se = _brute_force(head, branch)
    assert gain == pytest.approx(want_gain) and se == pytest.approx(want_se)


def test_pairing_removes_what_both_branches_share():
    """Units differ wildly in difficulty (losses 0.1 to 5); the branch is better by 0.02 on each.
    Unpaired, the spread of the units would swamp 0.02; paired, the gain is certain."""
    weights = [10.0] * 40
    head = Scores.of([0.1 + 0.12 * i for i in range(40)], weights)
    branch = Scores.of([v - 0.02 for v in head.losses], weights)
    gain, se, _ = paired_gain(head, branch)
    assert gain == pytest.approx(0.02) and se == pytest.approx(0.0, abs=1e-12)
    assert judge(head, branch, z=2.0).keep


def test_keep_only_above_z_standard_errors_and_the_head_wins_a_tie():
    rng = random.Random(0)
    weights = [20.0] * 64
    head = Scores.of([1.0 + rng.gauss(0, 0.2) for _ in weights], weights)
    noise = [rng.gauss(0, 0.1) for _ in weights]

    def branch(shift):
        return Scores.of([h - shift + e for h, e in zip(head.losses, noise)], weights)

    _, se, _ = paired_gain(head, branch(0.0))
    assert 0.005 < se < 0.03
    offset = sum(noise) / len(noise)  # the noise's own mean moves the gain a little
    clear = judge(head, branch(offset + 3 * se), z=2.0)
    assert clear.keep and "more than the evaluation noise" in clear.why
    within = judge(head, branch(offset + 1 * se), z=2.0)
    assert not within.keep and within.gain > 0 and "within the evaluation noise" in within.why
    worse = judge(head, branch(offset - 5 * se), z=2.0)
    assert not worse.keep and "no better" in worse.why
    identical = judge(head, head, z=2.0)
    assert not identical.keep and identical.gain == 0.0
    # z = 0: any gain at all is kept
    assert judge(head, branch(offset + 0.1 * se), z=0.0).keep
    assert set(clear.details()) == {"head_score", "branch_score", "gain", "stderr", "z", "units"}


def test_non_finite_scores_and_too_few_units():
    w = [5.0, 5.0, 5.0]
    finite = Scores.of([1.0, 1.2, 0.9], w)
    broken = Scores.of([math.nan, 1.0, 1.0], w)
    assert judge(broken, finite, z=2.0).keep  # a NaN head loses to any finite branch
    assert not judge(finite, broken, z=2.0).keep
    assert not judge(broken, broken, z=2.0).keep
    one = Scores.of([1.0], [5.0])
    gain, se, n = paired_gain(one, Scores.of([0.5], [5.0]))
    assert (gain, se, n) == (0.5, math.inf, 1)
    assert not judge(one, Scores.of([0.5], [5.0]), z=2.0).keep  # no noise estimate: nothing is shown
    assert Scores.of([1.0, 2.0], [0.0, 0.0]).units == 0 and math.isnan(Scores.of([1.0], [0.0]).mean)
    with pytest.raises(ValueError, match="different units"):
        paired_gain(finite, one)
    with pytest.raises(ValueError):
        Scores.of([1.0], [1.0, 2.0])


def test_units_without_tokens_are_left_out_of_the_pairs():
    head = Scores.of([1.0, 1.0, 2.0, 9.0], [4.0, 4.0, 4.0, 0.0])
    branch = Scores.of([0.5, 0.5, 1.5, 0.0], [4.0, 4.0, 4.0, 0.0])
    gain, se, n = paired_gain(head, branch)
    assert n == 3 and gain == pytest.approx(0.5) and se == pytest.approx(0.0)


def test_scores_round_trip_as_json_records():
    import json

    s = Scores.of([1.5, math.inf, 0.25], [3, 4, 5])
    back = Scores.from_record(json.loads(json.dumps(s.to_record(), allow_nan=False)))
    assert back == s


def test_the_rule_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import lossguard.recovery.verdict; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
