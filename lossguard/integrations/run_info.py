"""The ``run`` record: what a later reader needs to know about the run it is looking at."""

from __future__ import annotations

import platform
import sys
from typing import Any

from lossguard.config import GuardConfig
from lossguard.integrations import dist


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("lossguard", "torch", "transformers", "peft", "accelerate"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except ImportError:
                continue
        out[name] = str(getattr(mod, "__version__", "?"))
    return out


def param_counts(model: Any) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def device_map(model: Any) -> dict[str, Any] | None:
    """``hf_device_map`` of the model (PEFT wrappers included), when it was loaded with one."""
    seen = model
    for _ in range(4):
        dm = getattr(seen, "hf_device_map", None)
        if isinstance(dm, dict):
            return {str(k): str(v) for k, v in dm.items()}
        seen = getattr(seen, "base_model", None) or getattr(seen, "model", None)
        if seen is None:
            return None
    return None


def world_size(args: Any) -> int:
    return max(int(getattr(args, "world_size", 1) or 1), dist.world_size())


def run_record(args: Any, state: Any, model: Any, config: GuardConfig, capture_mode: str,
               cost: Any = None) -> dict[str, Any]:
    """The fields of the ``run`` record written at train begin (``cost``: the snapshot cost model's
    ``SnapshotCost``, when recovery measured one)."""
    total, trainable = param_counts(model) if model is not None else (None, None)
    world = world_size(args)
    return dict(
        versions=versions(),
        world_size=world,
        parallel_mode=str(getattr(getattr(args, "parallel_mode", None), "value", "unknown")),
        hf_device_map=device_map(model),
        total_params=total,
        trainable_params=trainable,
        max_steps=int(state.max_steps),
        num_train_epochs=float(args.num_train_epochs),
        start_step=int(state.global_step),
        effective_batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        output_dir=str(args.output_dir),
        capture=capture_mode,
        config=config.to_dict(),
        cost=cost.summary() if cost is not None else None,
    )
