"""User-facing configuration, validated on construction.

Bad configuration fails loudly: every constructor raises ``ValueError`` naming the field, the
value and the allowed range. Each section belongs to one layer (detection, recovery, probe, gpu)
and is plain data, so it serialises into the ``run`` record as it is.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lossguard.records import Reason


def _check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = (lo < value if lo_open else lo <= value) and value <= hi and not math.isnan(value)
    if not ok:
        left = "(" if lo_open else "["
        raise ValueError(f"{name}={value!r} is out of range; allowed {left}{lo}, {hi}]")


def _check_int(name: str, value: Any, lo: int, hi: int = 2**62) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer in [{lo}, {hi}]")
    _check_range(name, value, lo, hi)


def _check_types(section: Any) -> None:
    """Coerce each field to its declared type, or raise ``ValueError`` naming it.

    Numbers of any numeric type are accepted where a number is declared (an integer only where an
    integer is); a string is never a number or a boolean: ``"no"`` would be truthy.
    """
    for f in fields(section):
        declared = str(f.type).replace(" | None", "")
        value = getattr(section, f.name)
        if value is None and str(f.type).endswith("| None"):
            continue
        if declared == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{f.name}={value!r} must be True or False")
        elif declared == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{f.name}={value!r} must be an integer")
            setattr(section, f.name, int(value))
        elif declared == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{f.name}={value!r} must be a number")
            setattr(section, f.name, float(value))
        elif declared == "str" and isinstance(value, os.PathLike):
            setattr(section, f.name, os.fspath(value))
        elif declared == "str" and not isinstance(value, str):
            raise ValueError(f"{f.name}={value!r} must be a string")


def _named(section: str, error: ValueError) -> ValueError:
    """The same error with the section in front of the field: ``recovery.lr_factor=...``."""
    return ValueError(f"{section}.{error}")


@dataclass
class DetectionConfig:
    """When the detectors speak up. Defaults are tuned by ``benchmarks/detection.py``."""

    spike_window: int = 128
    spike_sigmas: float = 6.0
    min_history: int = 20
    divergence_window: int = 50
    divergence_probability: float = 0.99
    plateau_min_steps: int = 100
    early_fraction: float = 0.5
    vanishing_grad_norm: float = 1e-8
    vanishing_window: int = 20
    spike_min_rise: float = 0.2
    spike_tail_factor: float = 3.0
    grad_spike_ratio: float = 4.0
    divergence_min_rise: float = 0.1
    plateau_z: float = 3.0
    plateau_min_drop: float = 0.03
    stall_min_improvement: float = 0.05
    stall_rate: float = 2e-4
    stall_z: float = 2.0
    reference_tolerance: float = 0.1
    climb_factor: float = 1.5
    climb_z: float = 4.0
    cooldown_steps: int = 50
    # the detectors run over the samples of up to this many steps at once (each sample still on
    # its own; findings keep the step they name): at every multiple of it, at a non-finite loss or
    # grad norm, before a snapshot and at every step while a recovery is in progress. 1: every step
    batch_steps: int = 10

    def __post_init__(self) -> None:
        try:
            _check_types(self)
            self._check()
        except ValueError as e:
            raise _named("detection", e) from None

    def _check(self) -> None:
        _check_int("spike_window", self.spike_window, 8)
        _check_range("spike_sigmas", self.spike_sigmas, 1.0, 100.0)
        _check_int("min_history", self.min_history, 2)
        _check_int("divergence_window", self.divergence_window, 10)
        _check_range("divergence_probability", self.divergence_probability, 0.5, 1.0, lo_open=True)
        _check_int("plateau_min_steps", self.plateau_min_steps, 10)
        _check_range("early_fraction", self.early_fraction, 0.0, 1.0, lo_open=True)
        _check_range("vanishing_grad_norm", self.vanishing_grad_norm, 0.0, 1.0)
        _check_int("vanishing_window", self.vanishing_window, 2)
        _check_range("spike_min_rise", self.spike_min_rise, 0.0, 100.0)
        _check_range("spike_tail_factor", self.spike_tail_factor, 0.0, 100.0)
        _check_range("grad_spike_ratio", self.grad_spike_ratio, 1.0, 1e6)
        _check_range("divergence_min_rise", self.divergence_min_rise, 0.0, 100.0, lo_open=True)
        _check_range("plateau_z", self.plateau_z, 0.5, 100.0)
        _check_range("plateau_min_drop", self.plateau_min_drop, 0.0, 1.0)
        _check_range("stall_min_improvement", self.stall_min_improvement, 0.0, 1.0)
        _check_range("stall_rate", self.stall_rate, 0.0, 1.0)
        _check_range("stall_z", self.stall_z, 0.5, 100.0)
        _check_range("reference_tolerance", self.reference_tolerance, 0.0, 1.0)
        _check_range("climb_factor", self.climb_factor, 1.0, 1e6, lo_open=True)
        _check_range("climb_z", self.climb_z, 0.0, 100.0)
        _check_int("cooldown_steps", self.cooldown_steps, 0)
        _check_int("batch_steps", self.batch_steps, 1, 1000)


# the reasons a detector finds that may start a recovery (the others are lossguard's own verdicts)
TRIGGER_REASONS = (
    Reason.EARLY_CONVERGENCE,
    Reason.SPIKE,
    Reason.DIVERGENCE,
    Reason.NONFINITE,
    Reason.LR_TOO_HIGH,
    Reason.GRAD_EXPLOSION,
    Reason.GRAD_VANISHING,
    Reason.ZERO_LOSS,
)


def _triggers(value: Any) -> tuple[Reason, ...]:
    """``triggers`` as a tuple of reasons; one reason alone (``"spike"``) is a list of one."""
    allowed = ", ".join(r.value for r in TRIGGER_REASONS)
    items = [value] if isinstance(value, (str, Reason)) else value
    if not isinstance(items, Iterable):
        raise ValueError(f"triggers={value!r} must be a list of reasons; allowed: {allowed}")
    out = []
    for item in items:
        reason = next((r for r in TRIGGER_REASONS if item == r or item == r.value), None)
        if reason is None:
            raise ValueError(f"triggers: {item!r} is not a reason that can start a recovery; allowed: {allowed}")
        out.append(reason)
    return tuple(out)


DEFAULT_TRIGGERS = (
    Reason.EARLY_CONVERGENCE,
    Reason.SPIKE,
    Reason.DIVERGENCE,
    Reason.NONFINITE,
    Reason.LR_TOO_HIGH,
)


@dataclass
class RecoveryConfig:
    """How lossguard rolls back and retrains at a reduced learning rate."""

    enabled: bool = True
    triggers: tuple[Reason, ...] = DEFAULT_TRIGGERS
    rollback_steps: int = 100
    # None: chosen at train begin so that snapshots stay within snapshot_budget of training time
    snapshot_every: int | None = None
    snapshot_budget: float = 0.01
    lr_factor: float = 0.1
    max_low_lr_steps: int = 300
    restore_ramp_steps: int = 0
    cooldown_steps: int = 50
    max_rollbacks: int = 3
    on_give_up: str = "continue"
    snapshot_memory_mb: float = 512.0
    snapshot_dir: str | None = None
    snapshot_disk_keep: int = 8
    escalation: float = 0.5
    smooth_window: int = 20
    relapse_watch_steps: int = 150
    relapse_fraction: float = 0.5
    relapse_lr_scale: float = 0.3
    reset_optimizer_moments: bool = False
    plateau_needs_saddle: bool = False
    # the safety net: every rollback is judged against the branch it abandoned (guide.md)
    safety_net: bool = True
    judge_sequences: int = 64
    judge_z: float = 2.0
    # before a judged rollback, score the snapshot at the trouble's onset against the head and
    # decline the rollback when the head is clearly better (guide.md, "Look before rolling back")
    precheck: bool = True
    precheck_plateau_gain: float = 0.03

    def __post_init__(self) -> None:
        try:
            _check_types(self)
            self._check()
        except ValueError as e:
            raise _named("recovery", e) from None

    def _check(self) -> None:
        self.triggers = _triggers(self.triggers)
        _check_int("rollback_steps", self.rollback_steps, 0)
        if self.snapshot_every is not None:
            _check_int("snapshot_every", self.snapshot_every, 1)
        _check_range("snapshot_budget", self.snapshot_budget, 0.0, 1.0, lo_open=True)
        _check_range("lr_factor", self.lr_factor, 0.0, 1.0, lo_open=True)
        _check_int("max_low_lr_steps", self.max_low_lr_steps, 1)
        _check_int("restore_ramp_steps", self.restore_ramp_steps, 0)
        _check_int("cooldown_steps", self.cooldown_steps, 0)
        _check_int("max_rollbacks", self.max_rollbacks, 0)
        if self.on_give_up not in ("continue", "stop"):
            raise ValueError(f"on_give_up={self.on_give_up!r}; allowed 'continue' or 'stop'")
        _check_range("snapshot_memory_mb", self.snapshot_memory_mb, 0.0, 1e7)
        _check_int("snapshot_disk_keep", self.snapshot_disk_keep, 1)
        _check_range("escalation", self.escalation, 0.0, 1.0, lo_open=True)
        _check_int("smooth_window", self.smooth_window, 1)
        _check_int("relapse_watch_steps", self.relapse_watch_steps, 0)
        _check_range("relapse_fraction", self.relapse_fraction, 0.0, 1.0, lo_open=True)
        _check_range("relapse_lr_scale", self.relapse_lr_scale, 0.0, 1.0, lo_open=True)
        _check_int("judge_sequences", self.judge_sequences, 2, 1_000_000)
        _check_range("judge_z", self.judge_z, 0.0, 10.0)
        _check_range("precheck_plateau_gain", self.precheck_plateau_gain, 0.0, 1.0)


@dataclass
class ProbeConfig:
    """When and how hard the Hessian saddle probe looks."""

    enabled: bool = True
    on_plateau: bool = True
    every_n_steps: int = 0
    max_iter: int = 30
    max_seconds: float = 60.0
    batch_size: int = 64
    tol: float = 1e-3
    hvp: str = "auto"
    groups: int = 2
    max_time_fraction: float = 0.05
    min_iter: int = 10
    max_memory_fraction: float = 0.5
    max_memory_ratio: float = 1.5

    def __post_init__(self) -> None:
        try:
            _check_types(self)
            self._check()
        except ValueError as e:
            raise _named("probe", e) from None

    def _check(self) -> None:
        _check_int("every_n_steps", self.every_n_steps, 0)
        _check_range("max_time_fraction", self.max_time_fraction, 0.0, 1.0)
        _check_int("max_iter", self.max_iter, 2, 1000)
        _check_int("min_iter", self.min_iter, 2, 1000)
        _check_range("max_memory_fraction", self.max_memory_fraction, 0.0, 1.0, lo_open=True)
        _check_range("max_memory_ratio", self.max_memory_ratio, 1.0, 1000.0)
        _check_range("max_seconds", self.max_seconds, 0.0, 1e6, lo_open=True)
        _check_int("batch_size", self.batch_size, 1)
        _check_range("tol", self.tol, 0.0, 1.0)
        if self.hvp not in ("auto", "double_backward", "finite_difference"):
            raise ValueError(f"hvp={self.hvp!r}; allowed 'auto', 'double_backward' or 'finite_difference'")
        _check_int("groups", self.groups, 1, 16)


@dataclass
class GpuConfig:
    """The NVML sampler that runs beside training."""

    enabled: bool = True
    interval_s: float = 1.0

    def __post_init__(self) -> None:
        try:
            _check_types(self)
            self._check()
        except ValueError as e:
            raise _named("gpu", e) from None

    def _check(self) -> None:
        _check_range("interval_s", self.interval_s, 0.0, 3600.0, lo_open=True)


@dataclass
class GuardConfig:
    """Everything LossGuard can be told. ``GuardConfig()`` is the recommended default."""

    detection: DetectionConfig = field(default_factory=DetectionConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    console: bool = True
    log_subdir: str = "lossguard"

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            setattr(self, name, _section(name, cls, getattr(self, name)))
        if not isinstance(self.console, bool):
            raise ValueError(f"console={self.console!r} must be True or False")
        if not isinstance(self.log_subdir, str) or not self.log_subdir or "/" in self.log_subdir \
                or self.log_subdir in (".", ".."):
            raise ValueError(f"log_subdir={self.log_subdir!r} must be a plain directory name")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recovery"]["triggers"] = [t.value for t in self.recovery.triggers]
        return d


_SECTIONS: dict[str, type] = {
    "detection": DetectionConfig,
    "recovery": RecoveryConfig,
    "probe": ProbeConfig,
    "gpu": GpuConfig,
}

_TOP_LEVEL = ("console", "log_subdir")


def _section(name: str, cls: type, value: Any) -> Any:
    """One section from what the user passed: the section itself, a dict of its options, or
    ``True`` / ``False`` (defaults / switched off, for the sections that have ``enabled``)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, bool):
        if value:
            return cls()
        if "enabled" not in cls.__dataclass_fields__:
            raise ValueError(f"{name}=False: the {name} section cannot be switched off; "
                             "pass a dict of its options (recovery=False detects and reports only)")
        return cls(enabled=False)
    if isinstance(value, Mapping):
        known = list(cls.__dataclass_fields__)
        for key in value:
            if key not in known:
                near = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"{name}: unknown option {key!r}{hint}; allowed: {', '.join(known)}")
        return cls(**value)
    raise ValueError(f"{name}={value!r} must be a dict of options, a {cls.__name__}, True or False")


def resolve_config(owner: str, config: Any, sections: Mapping[str, Any]) -> GuardConfig:
    """The ``GuardConfig`` that ``LossGuard(...)`` / ``LoopGuard(...)`` arguments describe.

    Either a ``GuardConfig`` or keyword sections, not both: a keyword beside a config would have
    to either replace the config's section or be merged into it, and guessing wrong silently
    switches something back on (guide.md, "Attaching it").
    """
    allowed = (*_SECTIONS, *_TOP_LEVEL)
    for key in sections:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"{owner}: unknown option {key!r}{hint}; allowed: config, {', '.join(allowed)}")
    if config is None:
        return GuardConfig(**sections)
    if not isinstance(config, GuardConfig):
        raise ValueError(f"{owner}: config={type(config).__name__} must be a GuardConfig "
                         "(or pass the sections as keywords)")
    if sections:
        given = ", ".join(sections)
        raise ValueError(f"{owner}: got a GuardConfig and keyword options ({given}); pass one or the other, "
                         f"e.g. GuardConfig({next(iter(sections))}=...) or only the keywords")
    return config
