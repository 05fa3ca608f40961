"""The signals layer: streaming detectors of training trouble (stdlib + numpy, no torch)."""

from lossguard.signals.base import Detector
from lossguard.signals.degenerate import DegenerateLossDetector
from lossguard.signals.divergence import DivergenceDetector
from lossguard.signals.gradients import GradientDetector
from lossguard.signals.nonfinite import NonfiniteDetector
from lossguard.signals.plateau import PlateauDetector
from lossguard.signals.spike import GradExplosionDetector, SpikeDetector
from lossguard.signals.suite import DetectorSuite

__all__ = [
    "DegenerateLossDetector",
    "Detector",
    "DetectorSuite",
    "DivergenceDetector",
    "GradExplosionDetector",
    "GradientDetector",
    "NonfiniteDetector",
    "PlateauDetector",
    "SpikeDetector",
]
