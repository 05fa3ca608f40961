"""Disk faults on a real small tmpfs: does training survive lossguard? Prints a fault -> outcome table.

Each row is a real tiny Trainer run (``tiny_setup``, LoRA, a NaN loss at step 24 that makes
lossguard roll back and ask for a checkpoint) whose output directory is a 2 MB tmpfs mounted for
the run, brought to the fault:

- ``full``: a filler file leaves 100 KB free before training starts;
- ``fills during the run``: 600 KB free, and snapshots spill into it (``snapshot_memory_mb`` 0.4)
  until it is full (ENOSPC: safetensors raises ``SafetensorError``);
- ``read-only mount``: the tmpfs is read-only from the start (EROFS; a remount while the log is
  open for writing is refused by the kernel);
- ``room enough``: 1.5 MB free (the control: the checkpoint is asked for and written).

Mounting needs root (CAP_SYS_ADMIN); without it the script says so and exits 0. The test suite
covers the same paths without root (RLIMIT_FSIZE, a directory replaced by a file).

    sudo python benchmarks/faults.py
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from lossguard import GuardConfig, LossGuard  # noqa: E402
from lossguard.testing.tiny import make_trainer, tiny_setup  # noqa: E402

SIZE = "2m"


class NanAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step, self.current = step, 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        def hook(module: Any, a: Any, kwargs: Any, out: Any) -> Any:
            if self.current == self.step and module.training:
                out.loss = out.loss * float("nan")
            return out

        self.handle = model.register_forward_hook(hook, with_kwargs=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.current = state.global_step + 1

    def on_train_end(self, *a: Any, **kw: Any) -> None:
        self.handle.remove()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _mount(path: Path) -> bool:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _fill(path: Path, leave: int) -> None:
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(path / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def scenario(name: str, mount: Path) -> dict[str, Any]:
    out = mount / "run"
    recovery: dict[str, Any] = {"snapshot_every": 5, "rollback_steps": 10, "max_low_lr_steps": 8,
                                "relapse_watch_steps": 0}
    callbacks: list[Any] = [NanAt(24)]
    if name == "full":
        _fill(mount, 100 << 10)
    elif name == "fills during the run":
        _fill(mount, 600 << 10)
        recovery["snapshot_memory_mb"] = 0.4
    elif name == "read-only mount":
        out.mkdir()  # the Trainer creates output_dir when it is built
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    elif name == "room enough":
        _fill(mount, 1536 << 10)
    guard = LossGuard(GuardConfig(console=False, recovery=recovery))
    trainer = make_trainer(tiny_setup(n_train=128), str(out), callbacks=[guard, *callbacks], max_steps=40,
                           learning_rate=1e-2, logging_steps=50)
    lines = Lines()
    logging.getLogger("lossguard").addHandler(lines)
    t0 = time.perf_counter()
    try:
        trainer.train()
        crashed = None
    except Exception as err:  # what lossguard must never cause
        crashed = f"{type(err).__name__}: {err}"[:80]
    finally:
        logging.getLogger("lossguard").removeHandler(lines)
    ckpts = sorted(p.name for p in out.glob("checkpoint-*")) if out.is_dir() else []
    leftovers = sorted(p.name for p in (out / "lossguard" / "snapshots").glob(".tmp-*")) \
        if (out / "lossguard" / "snapshots").is_dir() else []
    return {"fault": name, "step": trainer.state.global_step, "rollbacks": guard.engine.policy.rollbacks,
            "crashed": crashed, "checkpoints": ckpts, "tmp_left": leftovers,
            "warnings": [w.replace(str(mount), "<tmpfs>") for w in lines.lines],
            "seconds": time.perf_counter() - t0}


def main() -> int:
    torch.set_num_threads(1)
    rows = []
    for name in ("room enough", "full", "fills during the run", "read-only mount"):
        with tempfile.TemporaryDirectory() as tmp:
            mount = Path(tmp)
            if not _mount(mount):
                print("lossguard: cannot mount a tmpfs here (needs root); nothing measured")
                return 0
            try:
                rows.append(scenario(name, mount))
            finally:
                subprocess.run(["umount", "-l", str(mount)], check=False)
    print(f"{'fault (2 MB tmpfs)':<22} {'outcome':<34} {'ckpt':<14} {'.tmp':<5} lossguard's warnings")
    for r in rows:
        outcome = f"crashed: {r['crashed']}" if r["crashed"] else f"finished step {r['step']}, {r['rollbacks']} rollback"
        warned = " | ".join(w.replace("lossguard: ", "").split(";")[0] for w in r["warnings"]) or "-"
        print(f"{r['fault']:<22} {outcome:<34} {','.join(r['checkpoints']) or '-':<14} {len(r['tmp_left']):<5} {warned}")
    return 0 if all(r["crashed"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
