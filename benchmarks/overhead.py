"""Wall-time overhead of LossGuard on a real tiny Trainer run (target: median ratio <= 1.02).

The same run (tiny LoRA Llama, CPU) with and without the callback. By default each repeat
trains the two side by side in lockstep (two threads passing a baton at every step, so a slow
spell of this shared machine hits both arms alike) and the figure is the median of the
repeats' ratios; ``--sequential`` instead times whole runs one after the other, alternating
the arms, and divides the arms' medians. What is left is the model instance's own speed: in
A/A pairs (no LossGuard in either arm) one instance ran 2-3% faster or slower than its twin, so
it takes ~16 pairs to pin the median to about +-0.7%. ``--processes N`` repeats the whole
comparison in N fresh processes and reports the median of their figures.

    python benchmarks/overhead.py [--steps 300] [--repeats 16] [--hidden 64] [--sequential] [--processes N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_once(with_guard: bool, steps: int, hidden: int, extra: dict) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, seconds inside LossGuard's hooks) of one
    ``trainer.train()``."""
    from lossguard import GuardConfig, LossGuard
    from lossguard.testing.tiny import make_trainer, tiny_setup

    setup = tiny_setup(hidden_size=hidden)
    callbacks = [LossGuard(GuardConfig(console=False, **extra))] if with_guard else []
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(setup, out, callbacks=callbacks, max_steps=steps, learning_rate=1e-2,
                               logging_steps=20)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, cpu, callbacks[0].hook_seconds if callbacks else 0.0


def _lockstep_pair(steps: int, hidden: int, extra: dict, first: int,
                   guard_slot: int) -> tuple[list[float], list[float], float]:
    """One baseline and one LossGuard Trainer, trained side by side in lockstep: ([baseline,
    lossguard] wall seconds, [baseline, lossguard] CPU seconds of their threads, seconds inside
    LossGuard's hooks).

    Each run is in its own thread; a baton lets exactly one of them work at a time and changes
    hands at every ``on_step_end``, so a step of one is always followed by a step of the other
    and a slow spell of the machine hits both alike. Each arm's time is the sum of its turns,
    from ``on_train_begin`` (both runs set up, the Trainer's start-of-run ``gc.collect()``
    done) to ``on_train_end``; the callbacks that pass the baton are the same in both arms.
    """
    import threading

    from transformers import TrainerCallback

    from lossguard import GuardConfig, LossGuard
    from lossguard.testing.tiny import make_trainer, tiny_setup

    cond = threading.Condition()
    state = {"turn": first, "done": [False, False]}
    ready = threading.Barrier(2)
    spent, cpu = [0.0, 0.0], [0.0, 0.0]

    class Baton(TrainerCallback):
        def __init__(self, me: int) -> None:
            self.me, self.t0, self.c0 = me, 0.0, 0.0

        def _take(self) -> None:
            with cond:
                while state["turn"] != self.me and not state["done"][1 - self.me]:
                    cond.wait()
            self.t0, self.c0 = time.perf_counter(), time.thread_time()

        def _give(self, done: bool = False) -> None:
            spent[self.me] += time.perf_counter() - self.t0
            cpu[self.me] += time.thread_time() - self.c0
            with cond:
                state["done"][self.me] = state["done"][self.me] or done
                state["turn"] = 1 - self.me
                cond.notify_all()

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            ready.wait()
            self._take()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self._give()
            self._take()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            self._give(done=True)

    guard = LossGuard(GuardConfig(console=False, **extra))
    errors: list[BaseException] = []

    def train(arm: int, trainer: Any) -> None:
        try:
            trainer.train()
        except BaseException as err:  # noqa: BLE001 - reported by the caller; the other arm must not wait forever
            errors.append(err)
            ready.abort()
            with cond:
                state["done"][arm] = True
                cond.notify_all()

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        arms = [int(slot == guard_slot) for slot in (0, 1)]  # slot: build order; arm 1 has LossGuard
        trainers = []
        for arm, out in zip(arms, (a, b)):  # built here, one after the other: the seeds are global
            # the baton first: LossGuard moves itself to the front at train begin, so on every
            # later event the baton's hook runs after LossGuard's and LossGuard's work is timed
            callbacks = [Baton(arm), guard] if arm == 1 else [Baton(arm)]
            trainers.append(make_trainer(tiny_setup(hidden_size=hidden), out, callbacks=callbacks,
                                         max_steps=steps, learning_rate=1e-2, logging_steps=20))
        threads = [threading.Thread(target=train, args=(arm, trainer)) for arm, trainer in zip(arms, trainers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return spent, cpu, guard.hook_seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--recording-only", action="store_true", help="recovery and probes off")
    ap.add_argument("--processes", type=int, default=1, help="fresh processes, each a full comparison")
    ap.add_argument("--sequential", action="store_true",
                    help="whole runs one after the other (alternating arms) instead of side by side in lockstep")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable timings on a shared machine; OpenMP spin-waits badly under load)")
    ns = ap.parse_args(argv)
    if ns.processes > 1:
        return _across_processes(ns, argv if argv is not None else sys.argv[1:])
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(ns.threads)
    extra = {"recovery": {"enabled": False}, "probe": {"enabled": False}} if ns.recording_only else {}
    print(f"steps={ns.steps} repeats={ns.repeats} hidden={ns.hidden} threads={ns.threads} "
          f"recording_only={ns.recording_only} mode={'sequential' if ns.sequential else 'lockstep'}")
    if ns.sequential:
        base, guarded, base_cpu, guarded_cpu, hooks = _sequential(ns, extra)
    else:
        base, guarded, base_cpu, guarded_cpu, hooks = _lockstep(ns, extra)
    b, g = statistics.median(base), statistics.median(guarded)
    bc, gc_ = statistics.median(base_cpu), statistics.median(guarded_cpu)
    print(f"baseline median {b:.3f} s ({1000 * b / ns.steps:.2f} ms/step)  runs: {[round(x, 3) for x in base]}")
    print(f"lossguard median {g:.3f} s ({1000 * g / ns.steps:.2f} ms/step)  runs: {[round(x, 3) for x in guarded]}")
    print(f"CPU time: baseline {1000 * bc / ns.steps:.2f} ms/step, lossguard {1000 * gc_ / ns.steps:.2f} ms/step, "
          f"ratio {gc_ / bc:.4f}; lossguard adds {1e6 * (gc_ - bc) / ns.steps:.0f} us/step")
    h = statistics.median(hooks)
    print(f"inside LossGuard's callback hooks: {1e6 * h / ns.steps:.0f} us/step (median of runs; train begin included, "
          f"the loss capture around training_step not), "
          f"{100 * h / b:.2f}% of the baseline run")
    pairs = sorted(x / y for x, y in zip(guarded, base))
    print(f"paired ratios (each lossguard run over the baseline run next to it): median {statistics.median(pairs):.4f}, "
          f"quartiles {pairs[len(pairs) // 4]:.4f}-{pairs[(3 * len(pairs)) // 4]:.4f}")
    if ns.sequential:
        print(f"overhead ratio (median lossguard / median baseline): {g / b:.4f}  target <= 1.02")
    else:
        print(f"pooled over the pairs (total lossguard / total baseline): {sum(guarded) / sum(base):.4f}")
        print(f"overhead ratio (median of the lockstep pairs' ratios): {statistics.median(pairs):.4f}  target <= 1.02")
    return 0


Arms = tuple[list[float], list[float], list[float], list[float], list[float]]


def _sequential(ns: argparse.Namespace, extra: dict) -> Arms:
    """Whole ``trainer.train()`` calls, alternating the arms: (baseline walls, lossguard walls,
    baseline CPU, lossguard CPU, hook seconds)."""
    run_once(True, 20, ns.hidden, extra)  # warm-up: imports, pretrained base cache, allocator
    base, guarded, base_cpu, guarded_cpu, hooks = [], [], [], [], []
    for i in range(ns.repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        for arm in order:
            wall, cpu, in_hooks = run_once(arm, ns.steps, ns.hidden, extra)
            if arm:
                hooks.append(in_hooks)
            (guarded if arm else base).append(wall)
            (guarded_cpu if arm else base_cpu).append(cpu)
    return base, guarded, base_cpu, guarded_cpu, hooks


def _lockstep(ns: argparse.Namespace, extra: dict) -> Arms:
    """``repeats`` lockstep pairs. Which arm is built first and which moves first alternate: a
    model built second ran up to a few percent slower or faster in A/A pairs (no LossGuard in
    either arm), so a fixed order would bias every pair the same way."""
    _lockstep_pair(20, ns.hidden, extra, 0, 1)  # warm-up
    out: Arms = ([], [], [], [], [])
    for i in range(ns.repeats):
        wall, cpu, in_hooks = _lockstep_pair(ns.steps, ns.hidden, extra, (i // 2) % 2, i % 2)
        for k, v in enumerate((wall[0], wall[1], cpu[0], cpu[1], in_hooks)):
            out[k].append(v)
    return out


def _across_processes(ns: argparse.Namespace, argv: list[str]) -> int:
    import re
    import subprocess

    child: list[str] = []
    skip = False
    for a in argv:  # the same arguments, less --processes (as "--processes N" or "--processes=N")
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            child.append(a)
    ratios, cpu_ratios, hook_us = [], [], []
    for k in range(ns.processes):
        out = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True, check=True).stdout
        ratio = float(re.search(r"overhead ratio .*?: ([\d.]+)", out).group(1))
        cpu_ratio = float(re.search(r"CPU time: .*?ratio ([\d.]+)", out).group(1))
        in_hooks = float(re.search(r"callback hooks: (\d+) us/step", out).group(1))
        ratios.append(ratio)
        cpu_ratios.append(cpu_ratio)
        hook_us.append(in_hooks)
        print(f"process {k + 1}/{ns.processes}: wall ratio {ratio:.4f}, CPU ratio {cpu_ratio:.4f}, "
              f"{in_hooks:.0f} us/step in the hooks", flush=True)
    print(f"median CPU-time ratio over {ns.processes} processes: {statistics.median(cpu_ratios):.4f} "
          f"(min {min(cpu_ratios):.4f}, max {max(cpu_ratios):.4f})")
    print(f"median time inside the hooks: {statistics.median(hook_us):.0f} us/step")
    print(f"median ratio over {ns.processes} processes: {statistics.median(ratios):.4f} "
          f"(min {min(ratios):.4f}, max {max(ratios):.4f})  target <= 1.02")
    return 0


if __name__ == "__main__":
    sys.exit(main())
