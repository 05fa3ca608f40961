"""The checkpoints ``LoopGuard`` writes when recovery asks for one (``checkpoint_dir``), and reading them back.

A hand-written loop has no Trainer to ask for a save, so the loop guard writes it itself: right
after a rollback (the restored pre-anomaly state: the fallback) and after the LR is restored
(the recovered state). The model and optimizer go through ``torch.distributed.checkpoint`` (DCP)
with its state-dict helpers, so one format serves a single process, DDP and FSDP2 alike: under
FSDP2 each rank writes its own shards (no rank gathers the model), and the checkpoint loads into
a fresh model on the same or another number of ranks. lossguard's own state (detectors, policy)
goes into ``lossguard_state.json``, written by rank 0.

    load_checkpoint(path, model, optimizer, guard)   # resume: weights, optimizer, lossguard state
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from lossguard.inspection import FALLBACK_NOTE
from lossguard.integrations import dist

logger = logging.getLogger("lossguard")

STATE_FILE = "lossguard_state.json"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def save_checkpoint(path: str | Path, model: Any, optimizer: Any, *, guard_state: dict[str, Any] | None = None,
                    note: dict[str, Any] | None = None) -> Path:
    """Write ``model`` and ``optimizer`` (DCP; every rank must call this) and, on rank 0,
    ``guard_state`` and ``note`` as JSON into the folder ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    if dist.rank() == 0:
        shutil.rmtree(path, ignore_errors=True)  # a name reused by an earlier run: its files would mix in
        path.mkdir(parents=True, exist_ok=True)
    if dist.is_distributed():
        dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))
    if dist.rank() == 0:
        if guard_state is not None:
            (path / STATE_FILE).write_text(json.dumps(guard_state, default=_jsonable))
        if note is not None:
            (path / FALLBACK_NOTE).write_text(json.dumps(note))
    return path


def load_checkpoint(path: str | Path, model: Any, optimizer: Any, guard: Any = None) -> dict[str, Any] | None:
    """Load a checkpoint ``save_checkpoint`` wrote into ``model`` and ``optimizer`` (every rank
    must call this), and its lossguard state into ``guard`` (a ``LoopGuard``) when given; returns
    that state (None when the checkpoint has none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    saved = json.loads((path / STATE_FILE).read_text()) if (path / STATE_FILE).is_file() else None
    if saved is not None and guard is not None:
        guard.load_state_dict(saved)
    return saved
