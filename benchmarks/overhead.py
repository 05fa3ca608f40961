"""Wall-time overhead of LossGuard on a real tiny Trainer run (target: median ratio <= 1.02).

The same run (tiny LoRA Llama, CPU) with and without the callback, interleaved so that machine
noise hits both arms alike; prints per-arm medians and their ratio. The ratio also moves by a
few percent from one Python process to the next (memory layout), so ``--processes N`` repeats
the whole comparison in N fresh processes and reports the median of their ratios.

    python benchmarks/overhead.py [--steps 300] [--repeats 7] [--hidden 64] [--processes 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--recording-only", action="store_true", help="recovery and probes off")
    ap.add_argument("--processes", type=int, default=1, help="fresh processes, each a full comparison")
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
    b, g = statistics.median(base), statistics.median(guarded)
    bc, gc_ = statistics.median(base_cpu), statistics.median(guarded_cpu)
    print(f"steps={ns.steps} repeats={ns.repeats} hidden={ns.hidden} threads={ns.threads} "
          f"recording_only={ns.recording_only}")
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
    print(f"overhead ratio (median lossguard / median baseline): {g / b:.4f}  target <= 1.02")
    return 0


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
