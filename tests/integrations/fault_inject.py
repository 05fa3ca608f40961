"""Faults injected into real Trainer runs: NaN losses, and a kill -9 at a named point."""

from __future__ import annotations

import contextlib
import os
import resource
import signal

from transformers import TrainerCallback


class NanAt(TrainerCallback):
    """Makes the loss of the given optimizer steps NaN (an overflow), which poisons the weights."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.current = 0
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        def hook(module, a, kwargs, out):
            if self.current in self.steps and module.training:
                out.loss = out.loss * float("nan")
            return out

        self.handle = model.register_forward_hook(hook, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kw):
        self.current = state.global_step + 1

    def on_train_end(self, *a, **kw):
        self.handle.remove()


def kill_now() -> None:
    """What ``kill -9`` does to this process: nothing is flushed, no handler runs."""
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_trainer_state(step: int) -> None:
    """Kill the process right after the Trainer wrote ``trainer_state.json`` of the checkpoint of ``step``."""
    from transformers import TrainerState

    original = TrainerState.save_to_json

    def save_to_json(self, json_path):
        original(self, json_path)
        if self.global_step == step and json_path.endswith("trainer_state.json"):
            kill_now()

    TrainerState.save_to_json = save_to_json


class DieAt(TrainerCallback):
    """Ends training at ``step`` in ``hook`` (after every callback before it), as a crash would:
    the exception propagates out of ``trainer.train()``; nothing after it runs."""

    def __init__(self, step: int, hook: str = "on_step_end"):
        self.step = step
        setattr(self, hook, self._maybe_die)

    def _maybe_die(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise SystemExit(f"died at step {self.step}")


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """No file may grow past ``nbytes`` in this process (RLIMIT_FSIZE, for root too): writes beyond
    fail with EFBIG (SIGXFSZ ignored), as writes to a full disk fail with ENOSPC."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
