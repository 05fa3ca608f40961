"""A reduced, seeded run of benchmarks/detection.py: the detectors must keep their quality."""

from lossguard.records import Reason
from lossguard.signals.synthetic import score, standard_set


def test_detection_quality_on_a_reduced_labelled_set():
    curves = standard_set(healthy=20, per_anomaly=4, log_every=(1, 20), seed=77)
    s = score(curves)
    assert s[Reason.NONFINITE].recall == 1.0
    assert s[Reason.SPIKE].recall >= 0.85
    assert s[Reason.DIVERGENCE].recall >= 0.9
    assert s[Reason.EARLY_CONVERGENCE].recall >= 0.75
    assert s[Reason.EARLY_CONVERGENCE].median_latency <= 250
    healthy = s[Reason.EARLY_CONVERGENCE].healthy_runs
    false_runs = s[Reason.EARLY_CONVERGENCE].healthy_runs_alarmed + s[Reason.DIVERGENCE].healthy_runs_alarmed
    assert healthy == 40 and false_runs <= 4
