"""Snapshots of everything a rollback restores, kept in a ring: memory first, then disk.

A snapshot holds the trainable parameters, the optimizer state, the LR scheduler state, the RNG
states (python, numpy, torch CPU and CUDA), lossguard's detector state and the global step.
For a LoRA adapter this is a few megabytes, so the default is an in-memory ring; past the memory
cap the oldest snapshots move to ``spill_dir`` as safetensors files (written atomically), so full
fine-tunes of large models keep a rollback target too. The first snapshot of the run is kept as
long as possible: it is the fallback of last resort.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import random
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("lossguard")


def unwrap(obj: Any) -> Any:
    """The torch object inside accelerate's wrappers (``AcceleratedOptimizer``/``Scheduler``)."""
    for attr in ("optimizer", "scheduler"):
        inner = getattr(obj, attr, None)
        if inner is not None and inner is not obj and type(obj).__name__.startswith("Accelerated"):
            return inner
    return obj


def trainable_parameters(model: Any) -> dict[str, torch.Tensor]:
    """The parameters the optimizer changes, by name (a LoRA adapter's, for a peft model)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _clone_tree(obj: Any, device: str | torch.device | None = "cpu") -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to(device, copy=True) if device is not None else t.clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v, device) for v in obj)
    return copy.deepcopy(obj)


def clone_tree(obj: Any) -> Any:
    """A deep copy whose tensors are fresh clones on their own device (never aliases)."""
    return _clone_tree(obj, None)


def _tree_nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tree_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tree_nbytes(v) for v in obj)
    return 0


def rng_state() -> dict[str, Any]:
    """Every random number generator training draws from."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Snapshot:
    """The trainable state of one step. ``params`` etc. are None while it lives on disk."""

    step: int
    params: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng: dict[str, Any] | None
    engine: dict[str, Any] | None
    nbytes: int = 0
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def on_disk(self) -> bool:
        return self.params is None and self.path is not None


def capture(step: int, model: Any, optimizer: Any, scheduler: Any = None,
            engine: dict[str, Any] | None = None) -> Snapshot:
    """A snapshot of ``model``'s trainable parameters, ``optimizer``, ``scheduler`` and RNGs, on CPU."""
    params = {n: p.detach().to("cpu", copy=True) for n, p in trainable_parameters(model).items()}
    opt_state = _clone_tree(unwrap(optimizer).state_dict()) if optimizer is not None else None
    sched = unwrap(scheduler) if scheduler is not None else None
    sched_state = copy.deepcopy(sched.state_dict()) if sched is not None else None
    snap = Snapshot(step=step, params=params, optimizer=opt_state, scheduler=sched_state,
                    rng=rng_state(), engine=copy.deepcopy(engine))
    snap.nbytes = _tree_nbytes(params) + _tree_nbytes(opt_state)
    return snap


# --- disk -------------------------------------------------------------------------------------
def _split_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in ``obj`` by placeholders, collecting them into ``out`` (for safetensors)."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        out[key] = obj.contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {k: _split_tensors(v, f"{prefix}/{k}", out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_split_tensors(v, f"{prefix}/{i}", out) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_snapshot(snap: Snapshot, directory: Path) -> Path:
    """Write ``snap`` under ``directory/step-<N>`` atomically (a temp folder renamed into place)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{snap.step:09d}"
    tmp = directory / f".tmp-step-{snap.step:09d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors({"params": snap.params, "optimizer": snap.optimizer}, "t", tensors)
    save_file(tensors, str(tmp / "tensors.safetensors"))
    with open(tmp / "rest.pkl", "wb") as fh:  # our own file: scheduler, RNG and detector state
        pickle.dump({"skeleton": skeleton, "scheduler": snap.scheduler, "rng": snap.rng,
                     "engine": snap.engine}, fh)
    (tmp / "meta.json").write_text(json.dumps({"step": snap.step, "nbytes": snap.nbytes, "t": time.time()}))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_snapshot(path: Path) -> Snapshot:
    """Read a snapshot written by ``save_snapshot``."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "tensors.safetensors"))
    with open(path / "rest.pkl", "rb") as fh:
        rest = pickle.load(fh)
    meta = json.loads((path / "meta.json").read_text())
    body = _join_tensors(rest["skeleton"], tensors)
    return Snapshot(step=int(meta["step"]), params=body["params"], optimizer=body["optimizer"],
                    scheduler=rest["scheduler"], rng=rest["rng"], engine=rest["engine"],
                    nbytes=int(meta["nbytes"]), path=path)


class SnapshotRing:
    """Snapshots by step: the newest in memory up to ``memory_mb``, older ones spilled to disk.

    Without a ``spill_dir`` the oldest are dropped instead (the first one last). On disk at most
    ``disk_keep`` are kept; the oldest is kept, the next oldest goes first.
    """

    def __init__(self, memory_mb: float = 512.0, spill_dir: str | os.PathLike[str] | None = None,
                 disk_keep: int = 8) -> None:
        self.memory_bytes = int(memory_mb * 2**20)
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.disk_keep = disk_keep
        self._snaps: dict[int, Snapshot] = {}

    def steps(self) -> list[int]:
        return sorted(self._snaps)

    def __len__(self) -> int:
        return len(self._snaps)

    def memory_nbytes(self) -> int:
        return sum(s.nbytes for s in self._snaps.values() if not s.on_disk)

    def add(self, snap: Snapshot) -> None:
        old = self._snaps.pop(snap.step, None)
        if old is not None:
            self._forget(old)
        self._snaps[snap.step] = snap
        self._enforce()

    def get(self, step: int) -> Snapshot:
        snap = self._snaps[step]
        return load_snapshot(snap.path) if snap.on_disk and snap.path is not None else snap

    def drop_after(self, step: int) -> None:
        """Forget snapshots newer than ``step`` (states of a trajectory that was rolled back)."""
        for s in [s for s in self._snaps if s > step]:
            self._forget(self._snaps.pop(s))

    def _forget(self, snap: Snapshot) -> None:
        if snap.path is not None:
            shutil.rmtree(snap.path, ignore_errors=True)

    def _evictable(self, on_disk: bool) -> list[int]:
        steps = self.steps()
        if len(steps) <= 1:
            return []
        pool = [s for s in steps[:-1] if self._snaps[s].on_disk == on_disk]
        if (on_disk or self.spill_dir is None) and len(pool) > 1 and pool[0] == steps[0]:
            return pool[1:] + pool[:1]  # the run's first snapshot goes last
        return pool

    def _enforce(self) -> None:
        while self.memory_nbytes() > self.memory_bytes:
            pool = self._evictable(on_disk=False)
            if not pool:
                break
            snap = self._snaps[pool[0]]
            if self.spill_dir is not None:
                try:
                    snap.path = save_snapshot(snap, self.spill_dir)
                    snap.params = snap.optimizer = snap.scheduler = snap.rng = snap.engine = None
                    continue
                except OSError as err:
                    logger.warning("lossguard: cannot write snapshot %s (%s); dropping it", snap.step, err)
            del self._snaps[snap.step]
        while sum(1 for s in self._snaps.values() if s.on_disk) > self.disk_keep:
            pool = self._evictable(on_disk=True)
            if not pool:
                break
            self._forget(self._snaps.pop(pool[0]))

    def clear(self) -> None:
        for snap in self._snaps.values():
            self._forget(snap)
        self._snaps.clear()

    def state_summary(self) -> dict[str, Iterable[int] | int]:
        """Which steps are held where, for telemetry."""
        return {"memory": [s for s in self.steps() if not self._snaps[s].on_disk],
                "disk": [s for s in self.steps() if self._snaps[s].on_disk],
                "memory_bytes": self.memory_nbytes()}
