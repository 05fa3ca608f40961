"""lossguard: training-dynamics diagnostics and recovery for fine-tuning language models.

``from lossguard import LossGuard`` gives the Hugging Face ``TrainerCallback``;
``LoopGuard`` the same detection and recovery for hand-written loops. Heavy
dependencies (torch, transformers) load only when the callback is first used, so the pure core
(detectors, telemetry, policy) imports without them.
"""

from __future__ import annotations

from typing import Any

from lossguard.config import DetectionConfig, GpuConfig, GuardConfig, ProbeConfig, RecoveryConfig
from lossguard.records import Action, ActionKind, Finding, Reason, Sample, Severity
from lossguard.signals.references import Objective, References

__version__ = "0.1.0"

__all__ = [
    "Action",
    "ActionKind",
    "DetectionConfig",
    "Finding",
    "GpuConfig",
    "GuardConfig",
    "LoopGuard",
    "LossGuard",
    "Objective",
    "ProbeConfig",
    "Reason",
    "RecoveryConfig",
    "References",
    "Sample",
    "Severity",
    "__version__",
    "label_references",
    "load_checkpoint",
    "load_run",
]


def __getattr__(name: str) -> Any:
    if name == "LossGuard":
        from lossguard.integrations.hf import LossGuard

        return LossGuard
    if name == "LoopGuard":
        from lossguard.integrations.loop import LoopGuard

        return LoopGuard
    if name == "label_references":
        from lossguard.integrations.references import label_references

        return label_references
    if name == "load_checkpoint":
        from lossguard.integrations.loop_checkpoint import load_checkpoint

        return load_checkpoint
    if name == "load_run":
        from lossguard.presentation.frames import load_run

        return load_run
    raise AttributeError(f"module 'lossguard' has no attribute {name!r}")
