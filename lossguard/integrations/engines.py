"""Which training engine runs the model (single process, DDP, FSDP1/FSDP2, DeepSpeed ZeRO), and
what lossguard does under it.

Read once at train begin from the live objects, not only from the arguments: a Trainer asked for
``fsdp="full_shard"`` on CPU runs plain DDP (accelerate keeps FSDP for accelerators), and the
parameters say what really happened (``DTensor``: FSDP2; ``FlatParameter``: FSDP1). Recording
and detection work everywhere (they read the loss, all-reduced, and the gradient norm). Recovery
and the Hessian probe touch the parameters and optimizer state, so they stay on only where that is
tested: one process, DDP, and FSDP2 in a hand-written loop (``LoopGuard``). Elsewhere they are
switched off with one line that says so, rather than restoring half a state: DeepSpeed keeps the
fp32 master weights and the optimizer state inside its own partitioned optimizer (ZeRO-1/2) and
the parameters too (ZeRO-3), and FSDP1 flattens them. ``LOSSGUARD_SHARDED_RECOVERY=1`` turns
recovery on for the Trainer under FSDP2 (the loop's machinery; ``benchmarks/gpu_sharded_check.py``
checks it on GPUs).
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lossguard.probes.hessian import SHARDED
from lossguard.recovery.sharding import fsdp_modules, is_sharded

FORCE_ENV = "LOSSGUARD_SHARDED_RECOVERY"


class EngineKind(str, enum.Enum):
    SINGLE = "single"
    DDP = "ddp"
    FSDP1 = "fsdp1"
    FSDP2 = "fsdp2"
    DEEPSPEED = "deepspeed"


@dataclass(frozen=True)
class Engine:
    """The engine, and which of lossguard's capabilities are on under it (``why``: why one is off)."""

    kind: EngineKind
    zero_stage: int | None = None
    recovery: bool = True
    probe: bool = True
    why: str | None = None
    requested: str | None = None  # what the arguments asked for, when another engine runs
    probe_why: str | None = None  # why the probe is off, the probe record's message

    @property
    def name(self) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage}" if self.kind is EngineKind.DEEPSPEED and self.zero_stage \
            is not None else {"single": "one process", "ddp": "DDP", "fsdp1": "FSDP1", "fsdp2": "FSDP2",
                              "deepspeed": "DeepSpeed"}[self.kind.value]

    def line(self, *, probe: bool = True) -> str | None:
        """One console line when something is off, or the engine is not the one asked for; else None
        (``probe``: the integration runs the probe at all)."""
        parts = []
        if self.requested:
            parts.append(f"{self.requested}: {self.name} runs, the model is not sharded")
        probe_on = self.probe or not probe
        if not (self.recovery and probe_on):
            off = " and ".join(x for x, on in (("recovery", self.recovery), ("the Hessian probe", probe_on)) if not on)
            parts.append(f"under {self.name} lossguard records and detects; {off} off ({self.why})")
        return "lossguard: " + "; ".join(parts) if parts else None

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "zero_stage": self.zero_stage, "recovery": self.recovery,
                "probe": self.probe, "why": self.why, "requested": self.requested, "probe_why": self.probe_why}


def _zero_stage(args: Any, accelerator: Any) -> int | None:
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    if stage is not None:
        return int(stage)
    config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or getattr(args, "deepspeed", None)
    if isinstance(config, (str, os.PathLike)) and Path(config).is_file():
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError):
            config = None
    if isinstance(config, dict):
        stage = (config.get("zero_optimization") or {}).get("stage")
        return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None
    env = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(env) if env and env.isdigit() else None


def _uses_deepspeed(model: Any, args: Any, accelerator: Any) -> bool:
    kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", "")).upper()
    return (kind == "DEEPSPEED" or type(model).__name__ == "DeepSpeedEngine"
            or getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None) is not None
            or bool(getattr(args, "deepspeed", None))
            or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true")


def _fsdp1(model: Any) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _requested_fsdp(args: Any, accelerator: Any) -> str | None:
    fsdp = getattr(args, "fsdp", None)
    if not fsdp and os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return None
    config = getattr(args, "fsdp_config", None)
    version = config.get("fsdp_version", config.get("version")) if isinstance(config, dict) else None
    what = f"FSDP{version or ''} ({'TrainingArguments.fsdp' if fsdp else 'ACCELERATE_USE_FSDP'})"
    kind = getattr(getattr(accelerator, "distributed_type", None), "value", None)
    return f"{what} was asked for but accelerate's distributed_type is {kind}" if kind else f"{what} was asked for"


def run_config(config: Any, engine: Engine) -> Any:
    """``config`` for a run under ``engine``: recovery disabled where the engine rules it out (the
    policy then decides nothing it could not carry out, and gives nothing up)."""
    if engine.recovery or not config.recovery.enabled:
        return config
    return replace(config, recovery=replace(config.recovery, enabled=False))


def detect(model: Any, *, args: Any = None, accelerator: Any = None, world_size: int = 1,
           loop: bool = False) -> Engine:
    """The engine running ``model`` (``args``/``accelerator``: the Trainer's, when there is one;
    ``loop``: lossguard runs as ``LoopGuard``, where FSDP2 recovery is tested)."""
    import torch

    if _uses_deepspeed(model, args, accelerator):
        stage = _zero_stage(args, accelerator)
        where = "its optimizer partitions the fp32 master weights and optimizer state" if stage != 3 else \
            "it partitions the parameters themselves"
        return Engine(EngineKind.DEEPSPEED, stage, recovery=False, probe=False,
                      why=f"a rollback cannot restore DeepSpeed's state from outside: {where}",
                      probe_why=f"probe skipped: the model runs under DeepSpeed ZeRO-{stage}, which the probe "
                                "does not support")
    inner = getattr(model, "module", model)
    if hasattr(inner, "modules") and _fsdp1(inner):
        return Engine(EngineKind.FSDP1, recovery=False, probe=False,
                      why="FSDP1 flattens the parameters; use fully_shard (FSDP2)",
                      probe_why="probe skipped: parameters are sharded (FSDP1)")
    params = inner.parameters() if hasattr(inner, "parameters") else ()
    if (hasattr(inner, "modules") and fsdp_modules(inner)) or any(is_sharded(p) for p in params):
        forced = os.environ.get(FORCE_ENV, "") == "1"
        recovery = loop or forced
        return Engine(EngineKind.FSDP2, recovery=recovery, probe=False, probe_why=SHARDED,
                      why=SHARDED if recovery else
                      f"not yet tested under the Trainer with FSDP2; {FORCE_ENV}=1 turns it on, as in a "
                      f"hand-written loop with LoopGuard where it is tested")
    requested = _requested_fsdp(args, accelerator)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or world_size > 1:
        return Engine(EngineKind.DDP, requested=requested)
    return Engine(EngineKind.SINGLE, requested=requested)
