"""The Hessian probe on the testbed: its verdict during healthy fine-tunes and in stalled ones.

Each row is a real ``Trainer`` run of a testbed scenario (``lossguard/testing/testbed``: a base
pretrained here on real text, fine-tuned as users do) with a callback that probes the model half way and at
the end of the run, the way lossguard's probe does it
(``probes.hessian.probe_model``): the trainable parameters only, every module in eval mode, the
training loss on kept training micro-batches (here the first 32 training rows, 4 micro-batches
of 8, split into the two groups whose verdicts must agree), its default iterations and
tolerance, with a budget wide enough (``max_seconds`` 120) that time does not cut it short.
The probe keeps every random generator as it was, so the run trains as it would without it.

Pairs (same data and adapter, one healthy, one stalled):
- LoRA SFT: ``sft-lora-1epoch`` (LR 1e-2, linear) against ``lr-too-high`` (a constant 6e-2:
  jumps, then sits above where it started);
- full fine-tune classifier: ``classify-healthy`` against ``classify-collapse`` (labels
  shuffled apart from their lines: the loss sits at the label prior's entropy).

    python benchmarks/testbed_probe.py [--scenarios ...] [--fractions 0.5 1.0]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from lossguard.config import ProbeConfig  # noqa: E402
from lossguard.probes.hessian import CurvatureResult, probe_model  # noqa: E402
from lossguard.testing.testbed.scenarios import SCENARIOS, make_trainer  # noqa: E402

PAIRS = (("sft-lora-1epoch", "lr-too-high"), ("classify-healthy", "classify-collapse"))
ROWS, MICRO = 32, 8


class ProbeAt(TrainerCallback):
    """Probes the model at the given optimizer steps; keeps each result with the loss around it."""

    def __init__(self, steps: set[int], batches: list[dict[str, Any]], config: ProbeConfig) -> None:
        self.steps, self.batches, self.config = steps, batches, config
        self.results: list[tuple[int, Any, float]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.global_step not in self.steps:
            return
        t0 = time.perf_counter()
        res = probe_model(model, self.batches, config=self.config, seed=0, step=state.global_step)
        self.results.append((state.global_step, res, time.perf_counter() - t0))


def run(name: str, fractions: list[float], config: ProbeConfig) -> dict[str, Any]:
    pieces = SCENARIOS[name].build()
    kept = [pieces.collator(pieces.train[i:i + MICRO]) for i in range(0, ROWS, MICRO)]
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(pieces, out)
        total = trainer.args.max_steps if trainer.args.max_steps > 0 else \
            math.ceil(len(pieces.train) / trainer.args.per_device_train_batch_size) * int(trainer.args.num_train_epochs)
        probe = ProbeAt({max(1, round(f * total)) for f in fractions}, kept, config)
        trainer.add_callback(probe)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    losses = {int(r["step"]): float(r["loss"]) for r in trainer.state.log_history if "loss" in r and "step" in r}
    trainable = sum(p.numel() for p in pieces.model.parameters() if p.requires_grad)
    return {"name": name, "expected": SCENARIOS[name].expected, "results": probe.results, "losses": losses,
            "trainable": trainable, "wall": wall}


def _mean_around(losses: dict[int, float], step: int, k: int = 5) -> float:
    vals = [v for s, v in losses.items() if step - k < s <= step]
    return sum(vals) / len(vals) if vals else math.nan


def _row(r: dict[str, Any], step: int, res: Any, seconds: float) -> str:
    loss = _mean_around(r["losses"], step)
    if not isinstance(res, CurvatureResult):
        return (f"| {r['name']} | {r['expected']} | {step} | {loss:.3f} | skipped: {res.reason} | | | | | "
                f"{seconds:.1f} |")
    groups = "; ".join(f"{g.get('verdict')} {g.get('lambda_min', math.nan):.3g}/{g.get('lambda_max', math.nan):.3g}"
                       for g in res.groups) if res.groups else ""
    return (f"| {r['name']} | {r['expected']} | {step} | {loss:.3f} | **{res.verdict.value}** | "
            f"{res.lambda_max:.4g} | {res.lambda_min:.4g} | {res.ratio:+.3f} | {groups} | "
            f"{res.n_hvp} ({res.method}), {seconds:.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", default=[n for pair in PAIRS for n in pair], choices=list(SCENARIOS))
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.5, 1.0])
    ap.add_argument("--max-seconds", type=float, default=120.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    config = ProbeConfig(max_seconds=args.max_seconds, max_time_fraction=1.0)
    print(f"probe on {ROWS} training rows ({ROWS // MICRO} micro-batches of {MICRO}, {config.groups} groups), "
          f"max_iter {config.max_iter}, budget {config.max_seconds:.0f} s; loss: mean of the 5 logged steps up to the probe")
    print("| scenario | expected | step | loss | verdict | lambda_max | lambda_min | ratio | per group (min/max) "
          "| products, seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    t_start = time.perf_counter()
    for name in args.scenarios:
        r = run(name, args.fractions, config)
        for step, res, seconds in r["results"]:
            print(_row(r, step, res, seconds))
        print(f"|  | {r['trainable']:,} trainable parameters; run {r['wall']:.0f} s with the probes |  |  |  |  |  |  |  |  |")
        sys.stdout.flush()
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
