"""The Trainer's own checkpoints as rollback targets, where lossguard's snapshots are too costly.

When the snapshot cadence that fits the budget is coarser than ``rollback_steps`` (a full
fine-tune of a large model), each checkpoint the Trainer writes anyway is *pinned*: its files are
hard-linked into the snapshot folder (no bytes copied; ``save_total_limit`` rotation deleting
``checkpoint-N`` then leaves the linked files alive) and offered to the policy as a snapshot of
step N. A rollback to it reads the trainable weights back with safetensors, the optimizer and
scheduler state from ``optimizer.pt``/``scheduler.pt`` (tensors only), the RNG states from
``rng_state.pth`` and lossguard's detector state from ``lossguard_state.json``.

Only checkpoints whose safetensors hold every trainable parameter (a full model's
``model*.safetensors``, a peft adapter's ``adapter_model.safetensors``) are taken, and only in a
single process (a DDP rank may not see rank 0's files; FSDP and DeepSpeed write other formats).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lossguard.recovery.snapshot import Snapshot

logger = logging.getLogger("lossguard")

PREFIX = "ckpt-"  # pinned folders are ckpt-step-<N>; SnapshotRing and remove_stale know the name
STATE_FILE = "lossguard_state.json"


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def key_map(folder: Path, names: list[str]) -> dict[str, tuple[str, str]] | None:
    """For each trainable parameter name, (file, key) in the checkpoint's safetensors; None when
    one is missing. A peft adapter's keys lack the adapter name (``lora_A.default.weight`` is saved
    as ``lora_A.weight``)."""
    from safetensors import safe_open

    where: dict[str, str] = {}
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                where.setdefault(key, f.name)
    out: dict[str, tuple[str, str]] = {}
    for name in names:
        candidates = [name] + [name.replace(f".{a}.", ".") for a in ("default",)]
        hit = next((k for k in candidates if k in where), None)
        if hit is None:
            return None
        out[name] = (where[hit], hit)
    return out


def pin(checkpoint: Path, spill_dir: Path, step: int, names: list[str]) -> Snapshot | None:
    """Hard-link ``checkpoint``'s files under ``spill_dir`` and describe them as a snapshot of
    ``step``; None (with the reason logged) when its weights do not cover ``names`` or linking
    fails (another file system: copying would cost the write the budget avoids)."""
    keys = key_map(checkpoint, names)
    if keys is None:
        logger.info("lossguard: %s does not hold every trainable parameter in safetensors; not a rollback target",
                    checkpoint.name)
        return None
    folder = spill_dir / f"{PREFIX}step-{step:09d}"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.mkdir(parents=True)
        for f in checkpoint.iterdir():
            if f.is_file():
                os.link(f, folder / f.name)
    except OSError as err:
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("lossguard: could not pin %s as a rollback target (%s)", checkpoint.name, err)
        return None
    nbytes = sum(f.stat().st_size for f in folder.iterdir())
    return Snapshot(step, nbytes=nbytes, path=folder,
                    meta={"source": "checkpoint", "checkpoint": checkpoint.name, "keys": keys})


def load(snap: Snapshot) -> Snapshot:
    """The pinned checkpoint ``snap`` describes, read back as a snapshot in memory."""
    from safetensors import safe_open

    folder = snap.path
    assert folder is not None
    params: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (fname, key) in snap.meta["keys"].items():
        by_file.setdefault(fname, []).append((name, key))
    for fname, pairs in by_file.items():
        with safe_open(str(folder / fname), framework="pt") as fh:
            for name, key in pairs:
                params[name] = fh.get_tensor(key)
    optimizer = _torch_file(folder / "optimizer.pt")
    scheduler = _torch_file(folder / "scheduler.pt")
    engine = None
    if (folder / STATE_FILE).is_file():
        engine = json.loads((folder / STATE_FILE).read_text()).get("detectors")
    return Snapshot(snap.step, params=params, optimizer=optimizer, scheduler=scheduler, rng=_rng(folder),
                    engine=engine, nbytes=snap.nbytes, path=folder, meta=snap.meta)


def _torch_file(path: Path) -> Any:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng(folder: Path) -> dict[str, Any] | None:
    """The Trainer's ``rng_state.pth`` in the form ``set_rng_state`` takes. It holds numpy's state,
    which torch's tensors-only loader refuses; the file is this run's own, linked minutes ago."""
    path = folder / "rng_state.pth"
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    state = {"python": saved["python"], "numpy": saved["numpy"], "torch": saved["cpu"]}
    if "cuda" in saved and torch.cuda.is_available():
        cuda = saved["cuda"]
        state["cuda"] = cuda if isinstance(cuda, (list, tuple)) else [cuda]
    return state
