"""Does recovery help? Tiny-model runs with and without LossGuard, same seed, same steps.

Scenarios (all real training on ``tiny_setup()``, nothing faked):
- stalled: learning rate 3e-2, the run stalls near the uniform-prediction loss (~2.9);
- spike: learning rate 1e-2 with a block of poisoned batches (labels replaced by one token);
- nan: learning rate 1e-2 with one step whose loss is NaN (an overflow), which poisons the weights;
- healthy: learning rate 1e-2 (and 3e-3), where LossGuard must not act.

Prints final held-out loss with and without LossGuard, rollbacks, extra wall time, the share of
step time spent on snapshots and the time of a rollback against the median step time.

    python benchmarks/recovery.py [--steps 600] [--seeds 0 1] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from lossguard import GuardConfig, LossGuard  # noqa: E402
from lossguard.records import ActionKind  # noqa: E402
from lossguard.testing.tiny import eval_loss, make_trainer, tiny_setup  # noqa: E402


class Inject(TrainerCallback):
    """Poisons real training: wrong labels for a block of steps, or one NaN loss."""

    def __init__(self, kind: str, at: int, length: int = 1) -> None:
        self.kind, self.at, self.length = kind, at, length
        self.handles: list[Any] = []
        self.step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        def pre(module: Any, a: Any, kwargs: dict[str, Any]) -> Any:
            if self.kind == "spike" and self._active() and "labels" in kwargs:
                labels = kwargs["labels"].clone()
                labels[labels != -100] = 5
                kwargs["labels"] = labels
            return a, kwargs

        def post(module: Any, a: Any, kwargs: dict[str, Any], out: Any) -> Any:
            if self.kind == "nan" and self._active() and getattr(out, "loss", None) is not None:
                out.loss = out.loss * float("nan")
            return out

        self.handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
                        model.register_forward_hook(post, with_kwargs=True)]

    def _active(self) -> bool:
        return self.at <= self.step < self.at + self.length

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.step = state.global_step + 1

    def on_train_end(self, *a: Any, **kw: Any) -> None:
        for h in self.handles:
            h.remove()


SCENARIOS: dict[str, dict[str, Any]] = {
    "stalled": {"lr": 3e-2},
    "spike": {"lr": 1e-2, "inject": ("spike", 300, 8)},
    "nan": {"lr": 1e-2, "inject": ("nan", 300, 1)},
    "healthy": {"lr": 1e-2},
    "healthy-3e-3": {"lr": 3e-3},
}


def run(scenario: str, seed: int, steps: int, guarded: bool, recovery: dict[str, Any]) -> dict[str, Any]:
    spec = SCENARIOS[scenario]
    setup = tiny_setup(seed=seed)
    callbacks: list[Any] = []
    guard = None
    if guarded:
        guard = LossGuard(GuardConfig(console=False, recovery=recovery))
        callbacks.append(guard)
    if "inject" in spec:
        callbacks.append(Inject(*spec["inject"]))
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(setup, out, callbacks=callbacks, learning_rate=spec["lr"], max_steps=steps,
                               logging_steps=100, seed=seed)
        saving = {"s": 0.0}
        original_save = trainer._save_checkpoint

        def timed_save(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return original_save(*a, **k)
            finally:
                saving["s"] += time.perf_counter() - t

        trainer._save_checkpoint = timed_save
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    result: dict[str, Any] = {"eval": eval_loss(setup.model, setup.eval, setup.collator), "wall": wall,
                              "rollbacks": 0, "actions": [], "overhead_s": saving["s"], "discarded": 0}
    if guard is not None:
        result["rollbacks"] = sum(1 for a in guard.actions if a.action is ActionKind.ROLLBACK)
        result["discarded"] = sum(a.details.get("discarded_steps", 0) for a in guard.actions)
        result["overhead_s"] += guard.hook_seconds
        result["actions"] = [f"{a.action.value}@{a.step}" + (f"->{a.to_step}" if a.action is ActionKind.ROLLBACK
                                                             else "") for a in guard.actions
                             if a.action in (ActionKind.ROLLBACK, ActionKind.LR_RESTORE, ActionKind.GIVE_UP)]
        result["findings"] = [f"{f.reason.value}@{f.step}(onset {f.onset_step})" for f in guard.findings]
        rec = guard.recovery.recoverer if guard.recovery is not None else None
        if rec is not None:
            result["snapshot_s"] = rec.snapshot_seconds
            result["n_snapshots"] = rec.n_snapshots
            result["rollback_s"] = rec.last_rollback_seconds
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    recovery: dict[str, Any] = {}
    print(f"{'scenario':<14}{'seed':>5}{'eval off':>10}{'eval on':>10}{'rollbacks':>10}{'discarded':>10}"
          f"{'extra wall':>11}{'lg time':>9}{'snap/step':>10}{'rollback/step':>14}  actions")
    ok_stalled, ok_healthy, extra = True, True, []
    for scenario in args.scenarios:
        for seed in args.seeds:
            off = run(scenario, seed, args.steps, False, recovery)
            on = run(scenario, seed, args.steps, True, recovery)
            step_s = off["wall"] / args.steps
            snap_share = on.get("snapshot_s", 0.0) / max(on["wall"], 1e-9)
            rb = on.get("rollback_s")
            rb_ratio = f"{rb / step_s:.3f}" if rb is not None else "-"
            extra.append(on["overhead_s"] / max(on["wall"] - on["overhead_s"], 1e-9))
            print(f"{scenario:<14}{seed:>5}{off['eval']:>10.3f}{on['eval']:>10.3f}{on['rollbacks']:>10}"
                  f"{on['discarded'] / args.steps:>10.1%}{on['wall'] / off['wall'] - 1:>+11.1%}{extra[-1]:>+9.1%}"
                  f"{snap_share:>10.2%}{rb_ratio:>14}  {' '.join(on['actions'])}")
            if scenario.startswith("healthy") and on["rollbacks"]:
                ok_healthy = False
            if scenario != "healthy" and not scenario.startswith("healthy"):
                better = (on["eval"] < off["eval"]) or (not math.isfinite(off["eval"]) and math.isfinite(on["eval"]))
                ok_stalled &= better
            sys.stdout.flush()
    print(f"better final loss in every troubled run: {ok_stalled}; no action on healthy runs: {ok_healthy}; "
          f"lossguard's own time (hooks + the saves it asked for) vs training: median {statistics.median(extra):+.1%}, "
          f"max {max(extra):+.1%}")
    print("columns: discarded = share of the run's steps rolled back; extra wall = guarded/unguarded wall time - 1 "
          "(noisy on a shared machine); lg time = time inside lossguard hooks and its saves / the rest; "
          "snap/step = snapshot time / wall; rollback/step = one restore / mean unguarded step time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
