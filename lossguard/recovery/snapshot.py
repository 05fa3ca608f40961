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
import operator
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lossguard.recovery.sharding import all_ranks, any_sharded, fsdp_modules, local_tensor, reshard

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


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite, exactly, at about the cost of one vectorised sum.

    A sum is NaN or infinite whenever a value is, so a finite sum settles it (half types are
    summed in float32, where they cannot overflow); only a sum that overflowed, or a tensor that
    really holds a NaN or an infinity, pays for the element-wise check (on a CPU ~30x slower:
    1.9-2.8 s against 0.07 s for 98M float32 values on one loaded core).
    """
    if not t.is_floating_point():
        return True
    total = t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


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


class Snapshot:
    """The trainable state of one step. ``params`` etc. are None while it lives on disk.

    A snapshot taken by ``Capturer`` keeps its tensors as a few flat CPU buffers; ``params``
    and ``optimizer`` are built from them (as views of the snapshot's own memory) when first
    read. The detector state is kept pickled, and ``engine`` unpickles a fresh copy per read.
    """

    def __init__(self, step: int, params: dict[str, torch.Tensor] | None = None,
                 optimizer: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None,
                 rng: dict[str, Any] | None = None, engine: dict[str, Any] | bytes | None = None,
                 nbytes: int = 0, path: Path | None = None, meta: dict[str, Any] | None = None) -> None:
        self.step = step
        self._params = params
        self._optimizer = optimizer
        self.scheduler = scheduler
        self.rng = rng
        self.engine = engine  # type: ignore[assignment]
        self.nbytes = nbytes
        self.path = path
        self.meta = meta if meta is not None else {}
        self._flat: _FlatState | None = None

    @property
    def params(self) -> dict[str, torch.Tensor] | None:
        if self._params is None and self._flat is not None:
            self._params = self._flat.params()
        return self._params

    @params.setter
    def params(self, value: dict[str, torch.Tensor] | None) -> None:
        self._params = value
        if value is None:
            if self._flat is not None and self._flat.release is not None:
                self._flat.release(self._flat.buffers)  # pinned buffers go back to the capturer's pool
            self._flat = None

    @property
    def optimizer(self) -> dict[str, Any] | None:
        if self._optimizer is None and self._flat is not None:
            self._optimizer = self._flat.optimizer()
        return self._optimizer

    @optimizer.setter
    def optimizer(self, value: dict[str, Any] | None) -> None:
        self._optimizer = value

    @property
    def engine(self) -> dict[str, Any] | None:
        if isinstance(self._engine, bytes):
            return pickle.loads(self._engine)
        return copy.deepcopy(self._engine)

    @engine.setter
    def engine(self, value: dict[str, Any] | bytes | None) -> None:
        if value is None or isinstance(value, bytes):
            self._engine: Any = value
            return
        try:
            self._engine = freeze(value)
        except Exception:  # something pickle refuses (a lambda, a lock): a deep copy still works
            self._engine = copy.deepcopy(value)

    @property
    def on_disk(self) -> bool:
        return self._params is None and self._flat is None and self.path is not None


def freeze(state: Any) -> bytes:
    """``state`` pickled: a private copy at a fraction of the cost of ``copy.deepcopy`` of detector state."""
    return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


@dataclass(frozen=True)
class _Layout:
    """Where each tensor of the trainable state sits in a snapshot's flat buffers."""

    names: list[str]
    slots: list[tuple[int, int, int, torch.Size]]  # (buffer, offset, numel, shape) per tensor: params, then state
    state_keys: list[tuple[Any, list[tuple[str, int | None]]]]  # per optimizer state entry: (key, slot or None)
    param_elems: list[int]  # per buffer: elements belonging to parameters (they come first)


@dataclass
class _FlatState:
    """A snapshot's tensors: flat CPU buffers plus the layout that gives them back their shapes."""

    layout: _Layout
    buffers: list[torch.Tensor]
    scalars: dict[tuple[Any, str], Any]
    param_groups: list[dict[str, Any]] | None
    ready: Any = None  # a CUDA event while device-to-host copies into the buffers are in flight
    release: Any = None  # gives pinned buffers back for reuse once the snapshot no longer needs them

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None

    def _view(self, i: int) -> torch.Tensor:
        self.wait()
        buf, off, n, shape = self.layout.slots[i]
        return self.buffers[buf][off:off + n].view(shape)

    def params(self) -> dict[str, torch.Tensor]:
        return {name: self._view(i) for i, name in enumerate(self.layout.names)}

    def optimizer(self) -> dict[str, Any] | None:
        if self.param_groups is None:
            return None
        state = {key: {k: (self.scalars[(key, k)] if slot is None else self._view(slot)) for k, slot in entries}
                 for key, entries in self.layout.state_keys}
        return {"state": state, "param_groups": self.param_groups}


_DEVICE_CHUNK_BYTES = 64 * 2**20  # bounds the temporary device memory of gathering GPU state


class Capturer:
    """Takes snapshots of one model/optimizer pair cheaply, step after step.

    The tensors to copy (trainable parameters, then optimizer state) are found once and kept
    as flat views; a snapshot is then one ``torch.cat`` per dtype and device into a new CPU
    buffer, instead of one copy per tensor, each with its own allocation and dispatch. When the optimizer's state tensors are replaced (its first step, a rollback's
    ``load_state_dict``), the layout is found again.
    """

    def __init__(self, model: Any, optimizer: Any = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self._named: list[tuple[str, torch.Tensor]] | None = None
        self._layout: _Layout | None = None
        self._live: list[torch.Tensor] = []
        self._param_ptrs: list[int] = []
        self._state_keys: list[Any] = []
        self._n_opt_params = -1
        self._sources: list[list[torch.Tensor]] = []
        self._copy_whole: list[bool] = []
        self._pinned = _PinnedCopies() if torch.cuda.is_available() else None
        self._sharded = False  # the parameters are DTensors: finiteness is agreed over the ranks
        self._fsdp: list[Any] | None = None  # the model's FSDP2 modules, found at the first snapshot

    def refresh(self) -> None:
        """Forget the cached parameters and layout (the model's trainable set may have changed)."""
        self._named = None
        self._layout = None

    def sharded_state(self) -> None:
        """FSDP2 only: the modules' sharded parameters in place (an evaluation may have left some gathered)."""
        if self._fsdp is None:
            self._fsdp = fsdp_modules(self.model)
        reshard(self._fsdp)

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        if self._named is None:
            self._named = list(trainable_parameters(self.model).items())
        return self._named

    def params_finite(self) -> bool:
        self.sharded_state()
        named = self.named_parameters()
        finite = all(all_finite(local_tensor(p).detach()) for _, p in named)
        return all_ranks(finite) if any_sharded(p for _, p in named) else finite

    def capture(self, step: int, scheduler: Any = None, engine: dict[str, Any] | bytes | None = None, *,
                require_finite: bool = False) -> Snapshot | None:
        """A snapshot on CPU; None when ``require_finite`` and a parameter is NaN or infinite."""
        self.sharded_state()
        state: dict[Any, dict[str, Any]] = {}
        groups = None
        if self.optimizer is not None:
            sd = unwrap(self.optimizer).state_dict()
            state, groups = sd["state"], sd["param_groups"]
        live = [v for entry in state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
        keys = list(state)
        n_opt = sum(len(g["params"]) for g in groups) if groups is not None else -1
        if ((keys != self._state_keys and n_opt != self._n_opt_params)
                or [local_tensor(p).data_ptr() for _, p in self._named or ()] != self._param_ptrs):
            # parameters added to the optimizer or swapped `.data`: look at the model again (the
            # optimizer's first step only adds state entries, and walking a large model costs ms)
            self._named = None
        if (self._named is None or self._layout is None or len(live) != len(self._live)
                or not all(map(operator.is_, live, self._live))):
            self._build(state, live, keys)
        layout = self._layout
        assert layout is not None
        pinned = self._pinned
        if pinned is not None and pinned.usable(self._sources, self._copy_whole):
            got = pinned.copy(self._sources, layout.param_elems, require_finite, agree=self._sharded)
            if got is None:
                return None
            buffers, ready = got
        else:
            ready = None
            buffers = self._host_copy(layout, require_finite)
            if buffers is None:
                return None
        scalars = {(key, k): copy.deepcopy(state[key][k]) for key, entries in layout.state_keys
                   for k, slot in entries if slot is None}
        sched = unwrap(scheduler) if scheduler is not None else None
        snap = Snapshot(step=step, scheduler=copy.deepcopy(sched.state_dict()) if sched is not None else None,
                        rng=rng_state(), engine=engine)
        groups = None if groups is None else [
            {k: list(v) if k == "params" else _clone_tree(v) for k, v in g.items()} for g in groups]
        snap._flat = _FlatState(layout, buffers, scalars, groups, ready, pinned.give_back if ready else None)
        snap.nbytes = sum(b.numel() * b.element_size() for b in buffers)
        return snap

    def fence(self) -> None:
        """Before anything writes the trainable state (the optimizer's step, a restore): wait on
        the device (not the host) for the snapshot copies still reading it."""
        if self._pinned is not None:
            self._pinned.fence()

    def _host_copy(self, layout: _Layout, require_finite: bool) -> list[torch.Tensor] | None:
        with torch.no_grad():
            buffers = []
            for sources, whole in zip(self._sources, self._copy_whole):
                if whole:
                    flat = torch.cat(sources)
                else:
                    flat = torch.cat([t.reshape(-1) for t in sources])
                buffers.append(flat if flat.device.type == "cpu" else flat.to("cpu"))
            if require_finite:
                finite = all(all_finite(b[:n]) for b, n in zip(buffers, layout.param_elems) if n)
                if not (all_ranks(finite) if self._sharded else finite):  # a shard's NaN: no rank keeps this step
                    return None
        return buffers

    def _build(self, state: dict[Any, dict[str, Any]], live: list[torch.Tensor], keys: list[Any]) -> None:
        named = self.named_parameters()
        # a sharded (FSDP2) tensor contributes this rank's shard only
        tensors = [local_tensor(p.detach()) for _, p in named] + [local_tensor(t) for t in live]
        self._sharded = any_sharded(p for _, p in named)
        n_params = len(named)
        order = sorted(range(len(tensors)), key=lambda i: (str(tensors[i].device), str(tensors[i].dtype), i >= n_params))
        slots: list[tuple[int, int, int, torch.Size]] = [(0, 0, 0, torch.Size())] * len(tensors)
        self._sources, self._copy_whole = [], []
        param_elems: list[int] = []
        chunk_key: Any = None
        chunk_bytes = offset = 0
        for i in order:
            t = tensors[i]
            key = (t.device, t.dtype)
            nb = t.numel() * t.element_size()
            if key != chunk_key or (t.device.type != "cpu" and chunk_bytes + nb > _DEVICE_CHUNK_BYTES):
                self._sources.append([])
                self._copy_whole.append(True)
                param_elems.append(0)
                chunk_key, chunk_bytes, offset = key, 0, 0
            b = len(self._sources) - 1
            if t.is_contiguous():
                self._sources[b].append(t.view(-1))
            else:  # flattened at each capture (a copy), so never a stale view
                self._sources[b].append(t)
                self._copy_whole[b] = False
            slots[i] = (b, offset, t.numel(), t.shape)
            if i < n_params:
                param_elems[b] += t.numel()
            offset += t.numel()
            chunk_bytes += nb
        state_keys: list[tuple[Any, list[tuple[str, int | None]]]] = []
        slot = n_params
        for key, entry in state.items():
            entries: list[tuple[str, int | None]] = []
            for k, v in entry.items():
                if isinstance(v, torch.Tensor):
                    entries.append((k, slot))
                    slot += 1
                else:
                    entries.append((k, None))
            state_keys.append((key, entries))
        self._layout = _Layout([n for n, _ in named], slots, state_keys, param_elems)
        self._live, self._state_keys = live, keys
        groups = unwrap(self.optimizer).param_groups if self.optimizer is not None else None
        self._n_opt_params = sum(len(g["params"]) for g in groups) if groups is not None else -1
        self._param_ptrs = [t.data_ptr() for t in tensors[:n_params]]


def _all_finite_on_device(tensors: list[torch.Tensor]) -> bool:
    """``all_finite`` of each tensor with one host read: their sums first, element-wise only when
    a sum is not finite."""
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    return bool(torch.isfinite(sums).all()) or all(all_finite(t) for t in tensors)


class _PinnedCopies:
    """CUDA state copied off the training path: non-blocking copies on a side stream into pinned
    host buffers reused across snapshots; one snapshot in flight at a time.

    The copies read the parameters and optimizer state in place (no device temporaries), so the
    next optimizer step, or a restore, must wait for them: ``fence`` makes the current stream wait
    on the copy stream (a device-side wait; the host never blocks). They overlap the next forward
    and backward passes. A snapshot's buffers are read only after its event has completed.
    """

    KEEP = 2  # spare buffers kept per size

    def __init__(self) -> None:
        self.stream: Any = None
        self.pending: Any = None  # the event of the copies in flight
        self.pool: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}

    @staticmethod
    def usable(sources: list[list[torch.Tensor]], whole: list[bool]) -> bool:
        return (any(src and src[0].device.type == "cuda" for src in sources)
                and all(w for src, w in zip(sources, whole) if src and src[0].device.type == "cuda"))

    def copy(self, sources: list[list[torch.Tensor]], param_elems: list[int],
             require_finite: bool, agree: bool = False) -> tuple[list[torch.Tensor], Any] | None:
        if require_finite:  # on the device, one host read; optimizer state in a chunk with parameters counts too
            checked = [t for src, n in zip(sources, param_elems) if n for t in src]
            finite = not checked or _all_finite_on_device(checked)
            if not (all_ranks(finite) if agree else finite):
                return None
        if self.pending is not None:  # bounded: one snapshot's copies in flight
            self.pending.synchronize()
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())  # copy the state as the last step left it
        buffers = []
        with torch.no_grad(), torch.cuda.stream(self.stream):
            for src in sources:
                n = sum(t.numel() for t in src)
                if src[0].device.type != "cuda":
                    buffers.append(torch.cat(src))
                    continue
                buf = self._take(n, src[0].dtype)
                off = 0
                for t in src:
                    buf[off:off + t.numel()].copy_(t, non_blocking=True)
                    off += t.numel()
                buffers.append(buf)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending = event
        return buffers, event

    def fence(self) -> None:
        if self.pending is not None and self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
            if self.pending.query():
                self.pending = None

    def _take(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        spare = self.pool.get((n, dtype))
        return spare.pop() if spare else torch.empty(n, dtype=dtype, pin_memory=True)

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        for buf in buffers:
            if buf.is_pinned():
                spare = self.pool.setdefault((buf.numel(), buf.dtype), [])
                if len(spare) < self.KEEP:
                    spare.append(buf)


def capture(step: int, model: Any, optimizer: Any, scheduler: Any = None,
            engine: dict[str, Any] | None = None) -> Snapshot:
    """A snapshot of ``model``'s trainable parameters, ``optimizer``, ``scheduler`` and RNGs, on CPU."""
    snap = Capturer(model, optimizer).capture(step, scheduler, engine)
    assert snap is not None
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


_SNAPSHOT_NAME = re.compile(r"(\.tmp-)?(ckpt-)?step-\d{9}(-\d+)?")  # ckpt-: a pinned Trainer checkpoint


def save_snapshot(snap: Snapshot, directory: Path) -> Path:
    """Write ``snap`` under ``directory/step-<N>`` atomically (a temp folder renamed into place)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{snap.step:09d}"
    tmp = directory / f".tmp-step-{snap.step:09d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _split_tensors({"params": snap.params, "optimizer": snap.optimizer}, "t", tensors)
        save_file(tensors, str(tmp / "tensors.safetensors"))  # raises SafetensorError, not OSError, on a full disk
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written snapshot is worth nothing
        raise
    return final


def remove_stale(directory: Path) -> int:
    """Delete the snapshot folders ``save_snapshot`` left in ``directory`` (an earlier run's, or a
    crashed write's); returns how many. Nothing else in the folder is touched."""
    removed = 0
    try:
        entries = list(directory.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if entry.is_dir() and _SNAPSHOT_NAME.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            removed += not entry.exists()
    return removed


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
        self.spill_error: str | None = None  # why spilling was turned off, when the disk refused a snapshot
        self._snaps: dict[int, Snapshot] = {}
        self._steps: tuple[int, ...] | None = None  # sorted(self._snaps), asked for after every training step
        # how snapshots that live elsewhere are read back, by their meta "source" (a pinned Trainer
        # checkpoint: ``checkpoint_target.load``, registered by whoever pins one)
        self.loaders: dict[str, Callable[[Snapshot], Snapshot]] = {}

    def steps(self) -> tuple[int, ...]:
        """The snapshot steps, oldest first (cached: no copy per training step)."""
        if self._steps is None:
            self._steps = tuple(sorted(self._snaps))
        return self._steps

    def __len__(self) -> int:
        return len(self._snaps)

    def newest_nbytes(self) -> int:
        """The size of the newest snapshot (about what a checkpoint of the trainable state takes)."""
        steps = self.steps()
        return self._snaps[steps[-1]].nbytes if steps else 0

    def memory_nbytes(self) -> int:
        return sum(s.nbytes for s in self._snaps.values() if not s.on_disk)

    def add(self, snap: Snapshot) -> int:
        """Keep ``snap``; how many snapshots this spilled to disk to stay within the memory cap."""
        self._steps = None
        old = self._snaps.pop(snap.step, None)
        if old is not None:
            self._forget(old)
        self._snaps[snap.step] = snap
        return self._enforce()

    def get(self, step: int) -> Snapshot:
        snap = self._snaps[step]
        loader = self.loaders.get(snap.meta.get("source"))
        if loader is not None:
            return loader(snap)
        return load_snapshot(snap.path) if snap.on_disk and snap.path is not None else snap

    def __contains__(self, step: object) -> bool:
        return step in self._snaps

    def drop_after(self, step: int) -> None:
        """Forget snapshots newer than ``step`` (states of a trajectory that was rolled back)."""
        for s in [s for s in self._snaps if s > step]:
            self._forget(self._snaps.pop(s))
            self._steps = None

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

    def _enforce(self) -> int:
        spilled = 0
        while self.memory_nbytes() > self.memory_bytes:
            pool = self._evictable(on_disk=False)
            if not pool:
                break
            snap = self._snaps[pool[0]]
            if self.spill_dir is not None:
                try:
                    snap.path = save_snapshot(snap, self.spill_dir)
                    snap.params = snap.optimizer = snap.scheduler = snap.rng = snap.engine = None
                    spilled += 1
                    continue
                except Exception as err:  # OSError, or safetensors' own SafetensorError on a full disk
                    self.spill_error = f"{type(err).__name__}: {err}"
                    logger.warning("lossguard: cannot write snapshot %s into %s (%s); snapshots stay in memory "
                                   "from now on, the oldest dropped past the memory cap (the run's first kept)",
                                   snap.step, self.spill_dir, self.spill_error)
                    self.spill_dir = None  # a disk that refused once would stall every later spill too
                    continue
            del self._snaps[snap.step]
            self._steps = None
        while sum(1 for s in self._snaps.values() if s.on_disk) > self.disk_keep:
            pool = self._evictable(on_disk=True)
            if not pool:
                break
            self._forget(self._snaps.pop(pool[0]))
            self._steps = None
        return spilled

    def clear(self) -> None:
        for snap in self._snaps.values():
            self._forget(snap)
        self._snaps.clear()
        self._steps = None

    def state_summary(self) -> dict[str, Iterable[int] | int]:
        """Which steps are held where, for telemetry."""
        return {"memory": [s for s in self.steps() if not self._snaps[s].on_disk],
                "disk": [s for s in self.steps() if self._snaps[s].on_disk],
                "memory_bytes": self.memory_nbytes()}
