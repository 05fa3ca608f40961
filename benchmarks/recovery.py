"""Does recovery help, and does it ever hurt? Tiny-model runs under each remedy, same seed, same steps.

Every run is real training on the tiny LoRA setup (``lossguard.testing.tiny``), nothing faked;
the same run is repeated under each remedy users have today and under lossguard:

- ``none``: no remedy;
- ``skip-step``: OLMo-core's skip-step (drop the update when loss or grad norm > mean + 6 sigma
  of the last 128 steps), ``peer_remedies.SkipStep``;
- ``zclip``: ZClip adaptive gradient clipping (EMA z-score 2.5), ``peer_remedies.ZClip``;
- ``plateau-cut``: an LR cut on plateau (torch's ReduceLROnPlateau), ``peer_remedies.PlateauCut``;
- ``lg-no-net``: ``LossGuard`` with ``recovery.safety_net=False``;
- ``lg-trial``: ``LossGuard`` with the safety net but ``recovery.precheck=False``: every rollback
  is tried and judged, none declined beforehand;
- ``lg``: ``LossGuard`` with the safety net and its look before rolling back (the defaults).

Runs (``SCENARIOS``): healthy runs on two tasks and three learning rates, and a run trained
from scratch whose loss falls late, all with lossguard's detection made over-sensitive
(``SENSITIVE``) so that false alarms happen; an LR-too-high run; spikes from poisoned batches
(a block, and scattered single batches); the stalled run (lr 3e-2, stuck near the
uniform-prediction loss); a NaN loss that poisons the weights; and a healthy run with
lossguard's default detection (``quiet``: what the safety net costs a run without findings).

Testbed runs (``tb-*``, ``--testbed-only``; ``lossguard/testing/testbed``): a base pretrained here
on real text, fine-tuned as users do, each in its own length and seed 0: a healthy LoRA SFT with
the over-sensitive detection (forced false alarms), the classifier collapsed to its label prior
(labels shuffled apart from their lines), an LR too high, rows from a foreign tokenizer, and a
model trained in float16 (non-finite from step ~4). Their held-out set: 256 examples of the same
task, correctly labelled, whose prompts neither the training set nor the judge's set holds.

The measure is the held-out loss at the end on a test set of 256 sequences that neither
training nor the safety net's judge (the Trainer's evaluation set, 64 other sequences) sees.
"extra" is the remedy's own time (its hooks, lossguard's judging, probes, snapshots and the
checkpoint saves it asks for) over the rest of the run's wall time, measured in the same run;
the step count is the same for every remedy (a rollback's discarded steps count as steps).

    python benchmarks/recovery.py [--quick] [--steps 600] [--seeds 0] [--scenarios ...] [--remedies ...]
                                  [--testbed-only | --no-testbed]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from peer_remedies import PlateauCut, SkipStep, ZClip  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from lossguard import GuardConfig, LossGuard  # noqa: E402
from lossguard.records import ActionKind  # noqa: E402
from lossguard.testing.tiny import SYMBOLS, PadCollator, eval_loss, make_trainer, tiny_setup  # noqa: E402

# detection made over-sensitive: every detector's bar lowered to (or near) its floor, so that
# healthy runs raise spikes, divergences and plateaus that are false alarms
SENSITIVE: dict[str, Any] = {
    "spike_sigmas": 1.5, "spike_min_rise": 0.0, "spike_tail_factor": 0.0, "min_history": 10,
    "divergence_window": 10, "divergence_probability": 0.6, "divergence_min_rise": 0.01,
    "plateau_min_steps": 20, "plateau_z": 0.5, "plateau_min_drop": 0.0,
    "stall_z": 0.5, "stall_rate": 0.01, "stall_min_improvement": 0.5, "early_fraction": 0.9,
}

REMEDIES = ("none", "skip-step", "zclip", "plateau-cut", "lg-no-net", "lg-trial", "lg")


@dataclass(frozen=True)
class Scenario:
    """One training run: task, LR, what is injected, and how lossguard's detection is set."""

    task: str = "reverse"
    lr: float = 1e-2
    inject: str | None = None  # "spike" (a block), "corrupt" (scattered batches), "nan"
    at: tuple[float, ...] = ()  # where, as fractions of the run
    length: int = 1  # steps per injection
    wsd: bool = False  # warmup-stable-decay schedule (constant LR, then a decay over the last 30%)
    sensitive: bool = False  # lossguard's detection over-sensitive (forced false alarms)
    healthy: bool = False
    remedies: tuple[str, ...] = REMEDIES
    note: str = ""
    testbed: str | None = None  # a testbed scenario (its own data, model, length and cause) instead of the tiny run


SCENARIOS: dict[str, Scenario] = {
    "healthy-rev-1e-2": Scenario(lr=1e-2, sensitive=True, healthy=True, note="reversal, lr 1e-2"),
    "healthy-rev-3e-3": Scenario(lr=3e-3, sensitive=True, healthy=True, note="reversal, lr 3e-3"),
    "healthy-sort-1e-2": Scenario(task="sort", lr=1e-2, sensitive=True, healthy=True, note="sorting, lr 1e-2"),
    "late-drop": Scenario(lr=1e-2, wsd=True, sensitive=True, healthy=True,
                          note="reversal, lr 1e-2 held, then decayed: flat from ~40% to 80%, then a sharp drop"),
    "lr-too-high": Scenario(lr=1.5e-2, wsd=True, note="reversal, lr 1.5e-2 held, then decayed: noisy, rises mid-run"),
    "spike": Scenario(lr=1e-2, inject="spike", at=(0.5,), length=8, note="8 poisoned batches at mid-run"),
    "corrupt": Scenario(lr=1e-2, inject="corrupt", at=(0.25, 0.45, 0.65, 0.8), length=2,
                        note="corrupted examples: 4 x 2 batches of shuffled labels"),
    "stalled": Scenario(lr=3e-2, note="reversal at lr 3e-2: stuck near the uniform loss"),
    "nan": Scenario(lr=1e-2, inject="nan", at=(0.5,), note="one NaN loss at mid-run"),
    "quiet": Scenario(lr=1e-2, healthy=True, remedies=("lg-no-net", "lg"),
                      note="healthy, default detection: the safety net's cost without findings"),
    # the testbed (lossguard/testing/testbed): a base pretrained on real text, fine-tuned as users do
    "tb-healthy": Scenario(testbed="sft-lora-1epoch", sensitive=True, healthy=True,
                           note="testbed LoRA SFT, 100 steps, detection over-sensitive (forced false alarms)"),
    "tb-collapse": Scenario(testbed="classify-collapse",
                            note="testbed classifier, labels shuffled apart from their lines: sits at the prior"),
    "tb-lr-too-high": Scenario(testbed="lr-too-high", note="testbed LoRA SFT at a constant 6e-2"),
    "tb-corrupted": Scenario(testbed="corrupted-examples", note="testbed LoRA SFT, 3 rows from a foreign tokenizer"),
    "tb-fp16": Scenario(testbed="fp16-overflow", note="testbed full SFT with the model in float16: NaN from step ~4"),
}
TESTBED = tuple(name for name, spec in SCENARIOS.items() if spec.testbed)


def dataset(tok: Any, n: int, seed: int, task: str, lengths: tuple[int, int] = (3, 6)) -> list[dict[str, list[int]]]:
    """``n`` prompt/answer examples (the prompt masked) of ``task``: "reverse" or "sort"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        symbols = [rng.choice(SYMBOLS) for _ in range(rng.randint(*lengths))]
        answer = symbols[::-1] if task == "reverse" else sorted(symbols)
        prompt = ["<s>", "rev", ":", *symbols, "=>"]
        ids = tok.convert_tokens_to_ids(prompt + answer + ["</s>"])
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + ids[len(prompt):]})
    return out


class Inject(TrainerCallback):
    """Damages real training at chosen steps: a block of batches whose labels are all one token
    ("spike"), batches whose target tokens are shuffled across the batch ("corrupt"), or one NaN loss."""

    def __init__(self, kind: str, steps: set[int], seed: int) -> None:
        self.kind, self.steps = kind, steps
        self.rng = torch.Generator().manual_seed(seed)
        self.handles: list[Any] = []
        self.step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        def pre(module: Any, a: Any, kwargs: dict[str, Any]) -> Any:
            if module.training and self.step in self.steps and "labels" in kwargs:
                labels = kwargs["labels"].clone()
                mask = labels != -100
                if self.kind == "spike":
                    labels[mask] = 5
                elif self.kind == "corrupt":
                    targets = labels[mask]
                    labels[mask] = targets[torch.randperm(len(targets), generator=self.rng)]
                kwargs["labels"] = labels
            return a, kwargs

        def post(module: Any, a: Any, kwargs: dict[str, Any], out: Any) -> Any:
            if self.kind == "nan" and module.training and self.step in self.steps and getattr(out, "loss", None) is not None:
                out.loss = out.loss * float("nan")
            return out

        self.handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
                        model.register_forward_hook(post, with_kwargs=True)]

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.step = state.global_step + 1

    def on_train_end(self, *a: Any, **kw: Any) -> None:
        for h in self.handles:
            h.remove()


def injected_steps(spec: Scenario, steps: int) -> set[int]:
    return {int(f * steps) + i for f in spec.at for i in range(spec.length)}


@dataclass
class Result:
    loss: float
    wall: float
    own: float  # the remedy's own seconds
    rollbacks: int = 0
    kept: int = 0
    reverted: int = 0
    declined: int = 0
    discarded: int = 0
    acted: list[str] = field(default_factory=list)

    @property
    def extra(self) -> float:
        return self.own / max(self.wall - self.own, 1e-9)


def remedy(name: str, spec: Scenario) -> tuple[Any, dict[str, Any]]:
    """The callback for ``name`` and the TrainingArguments it needs."""
    if name == "skip-step":
        return SkipStep(), {"max_grad_norm": 0.0}
    if name == "zclip":
        return ZClip(), {"max_grad_norm": 0.0}
    if name == "plateau-cut":
        return PlateauCut(), {}
    if name in ("lg", "lg-trial", "lg-no-net"):
        detection = SENSITIVE if spec.sensitive else {}
        config = GuardConfig(console=False, detection=detection,
                             recovery={"safety_net": name != "lg-no-net", "precheck": name == "lg"})
        return LossGuard(config), {}
    return None, {}


def held_out_testbed(name: str, pieces: Any, n: int = 256) -> list[dict[str, list[int]]]:
    """``n`` held-out examples of a testbed scenario's task that neither its training set nor its
    evaluation set (the judge's) holds, correctly labelled and masked as the scenario masks its
    evaluation set."""
    from lossguard.testing.testbed import tasks as T
    from lossguard.testing.testbed.scenarios import N_EVAL

    def prompt(ex: dict[str, list[int]]) -> tuple[int, ...]:
        return tuple(t for t, label in zip(ex["input_ids"], ex["labels"]) if label == -100)

    seen = {prompt(ex) for ex in pieces.train + pieces.eval}  # by prompt: a misaligned row keeps its line
    classify = "prior_entropy" in pieces.notes
    more = len(pieces.train) + 2 * N_EVAL + 2 * n
    pairs = T.classification_pairs(more, seed=1) if classify else T.instruction_pairs(more, seed=1)
    out = []
    for pair in pairs:
        ex = T.encode(pieces.tokenizer, pair, eos=not classify)
        if prompt(ex) in seen:
            continue
        seen.add(prompt(ex))
        out.append(ex)
        if len(out) == n:
            break
    return out


def run_testbed(name: str, spec: Scenario, seed: int) -> Result:
    """A testbed scenario under a remedy: its own model, data and length (``--steps`` does not apply)."""
    from lossguard.testing.testbed.scenarios import SCENARIOS as TESTBED_SCENARIOS
    from lossguard.testing.testbed.scenarios import make_trainer as testbed_trainer

    pieces = TESTBED_SCENARIOS[spec.testbed].build()
    test = held_out_testbed(spec.testbed, pieces)
    callback, overrides = remedy(name, spec)
    with tempfile.TemporaryDirectory() as out:
        trainer = testbed_trainer(pieces, out, callbacks=[callback] if callback is not None else [], **overrides)
        collator = PadCollator(pieces.tokenizer.pad_token_id)
        return _train_and_measure(trainer, callback, lambda: eval_loss(pieces.model, test, collator))


def run(name: str, spec: Scenario, seed: int, steps: int) -> Result:
    if spec.testbed:
        return run_testbed(name, spec, seed)
    setup = tiny_setup(seed=seed)
    tok = setup.tokenizer
    if spec.task != "reverse":
        setup.train = dataset(tok, 512, seed, spec.task)
        setup.eval = dataset(tok, 64, seed + 10_000, spec.task)  # the judge's
    test = dataset(tok, 256, seed + 20_000, spec.task)
    callback, overrides = remedy(name, spec)
    callbacks = [callback] if callback is not None else []
    if spec.inject:
        callbacks.append(Inject(spec.inject, injected_steps(spec, steps), seed))
    with tempfile.TemporaryDirectory() as out:
        if spec.wsd:
            overrides.update(lr_scheduler_type="warmup_stable_decay",
                             lr_scheduler_kwargs={"num_decay_steps": int(0.3 * steps)})
        trainer = make_trainer(setup, out, callbacks=callbacks, learning_rate=spec.lr, max_steps=steps,
                               logging_steps=100, seed=seed, **overrides)
        return _train_and_measure(trainer, callback, lambda: eval_loss(setup.model, test, setup.collator))


def _train_and_measure(trainer: Any, callback: Any, held_out: Any) -> Result:
    """Train, then the held-out loss and what the remedy did and cost."""
    saving = {"s": 0.0}
    original_save = trainer._save_checkpoint

    def timed_save(*a: Any, **k: Any) -> Any:  # only lossguard asks for saves (save_strategy "no")
        t = time.perf_counter()
        try:
            return original_save(*a, **k)
        finally:
            saving["s"] += time.perf_counter() - t

    trainer._save_checkpoint = timed_save
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    loss = held_out()
    if callback is None:
        return Result(loss, wall, 0.0)
    if not isinstance(callback, LossGuard):
        acted = [f"skipped {len(callback.skipped)}"] if isinstance(callback, SkipStep) else \
            [f"clipped {callback.clipped}"] if isinstance(callback, ZClip) else [f"cuts at {callback.cuts}"]
        return Result(loss, wall, callback.seconds, acted=acted)
    acts = callback.actions
    acted = [f"{a.action.value}@{a.step}" + (f"->{a.to_step}" if a.action in (ActionKind.ROLLBACK, ActionKind.REVERT)
                                             else "") + (f"({a.reason.value})" if a.action is ActionKind.ROLLBACK
                                                         and a.reason is not None else "")
             for a in acts if a.action in (ActionKind.ROLLBACK, ActionKind.KEEP, ActionKind.REVERT, ActionKind.DECLINE,
                                           ActionKind.GIVE_UP)]
    return Result(loss, wall, callback.hook_seconds + saving["s"],
                  rollbacks=sum(a.action is ActionKind.ROLLBACK for a in acts),
                  kept=sum(a.action is ActionKind.KEEP for a in acts),
                  reverted=sum(a.action is ActionKind.REVERT for a in acts),
                  declined=sum(a.action is ActionKind.DECLINE for a in acts),
                  discarded=sum(int(a.details.get("discarded_steps", 0)) for a in acts
                                if a.action is ActionKind.ROLLBACK), acted=acted)


def _loss(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "nan"


def _rel(a: float, b: float) -> str:
    return f"{a / b - 1:+.1%}" if math.isfinite(a) and math.isfinite(b) and b else "-"


def targets(results: dict[tuple[str, int, str], Result], seeds: Sequence[int]) -> list[str]:
    """The issue's targets, each with the figures it was judged on."""
    lines = []

    def get(s: str, seed: int, r: str) -> Result | None:
        return results.get((s, seed, r))

    worst = []
    for (s, seed, r), res in results.items():
        base = get(s, seed, "none")
        if r == "lg" and SCENARIOS[s].healthy and SCENARIOS[s].sensitive and base is not None:
            worst.append((res.loss / base.loss - 1 if math.isfinite(res.loss) else math.inf, s, seed))
    if worst:
        w = max(worst)
        lines.append(f"forced false alarms: worst healthy run with lg vs none {w[0]:+.1%} ({w[1]} seed {w[2]}); "
                     f"target <= +2%: {'met' if w[0] <= 0.02 else 'MISSED'}")
    stalled = [res for (s, _, r), res in results.items() if s == "stalled" and r == "lg"]
    if stalled:
        ok = all(0.8 <= res.loss <= 1.3 for res in stalled)
        lines.append(f"stalled with lg: {', '.join(_loss(res.loss) for res in stalled)} (target 0.8-1.3: "
                     f"{'met' if ok else 'MISSED'}); extra compute {', '.join(f'{res.extra:+.1%}' for res in stalled)} "
                     f"(target <= +20%: {'met' if all(res.extra <= 0.2 for res in stalled) else 'MISSED'})")
    nan = [res for (s, _, r), res in results.items() if s == "nan" and r == "lg"]
    if nan:
        ok = all(math.isfinite(res.loss) for res in nan)
        lines.append(f"nan with lg: {', '.join(_loss(res.loss) for res in nan)} (target finite: {'met' if ok else 'MISSED'})")
    for s in ("spike", "corrupt", "lr-too-high"):
        for seed in seeds:
            lg = get(s, seed, "lg")
            peers = {r: get(s, seed, r) for r in ("skip-step", "zclip", "plateau-cut")}
            peers = {r: p for r, p in peers.items() if p is not None}
            if lg is None or not peers:
                continue
            best = min(peers, key=lambda r: peers[r].loss if math.isfinite(peers[r].loss) else math.inf)
            b = peers[best].loss
            ok = math.isfinite(lg.loss) and (not math.isfinite(b) or lg.loss <= b)
            lines.append(f"{s} seed {seed}: lg {_loss(lg.loss)} vs best peer {best} {_loss(b)} "
                         f"({lg.loss / b - 1:+.1%}); target lg <= best peer: {'met' if ok else 'MISSED'}")
    for s in TESTBED:
        none, lg, off = get(s, seeds[0], "none"), get(s, seeds[0], "lg"), get(s, seeds[0], "lg-no-net")
        if none is None or lg is None:
            continue
        peers = {r: p for r in ("skip-step", "zclip", "plateau-cut") if (p := get(s, seeds[0], r)) is not None}
        best = min(peers, key=lambda r: peers[r].loss if math.isfinite(peers[r].loss) else math.inf) if peers else None
        line = (f"{s}: none {_loss(none.loss)}, lg {_loss(lg.loss)} ({_rel(lg.loss, none.loss)} vs none), "
                f"lg-no-net {_loss(off.loss) if off is not None else '-'}")
        if best is not None:
            line += f", best peer {best} {_loss(peers[best].loss)}"
        if SCENARIOS[s].healthy:
            w = lg.loss / none.loss - 1 if math.isfinite(lg.loss) else math.inf
            line += f"; forced false alarms: target lg <= +2% vs none: {'met' if w <= 0.02 else 'MISSED'}"
        lines.append(line)
    for seed in seeds:
        on, off = get("quiet", seed, "lg"), get("quiet", seed, "lg-no-net")
        if on is not None and off is not None:
            lines.append(f"quiet seed {seed}: findings-free run, lossguard's own time {off.extra:+.2%} without the net, "
                         f"{on.extra:+.2%} with it; rollbacks {on.rollbacks}; same final loss: "
                         f"{on.loss == off.loss} ({_loss(on.loss)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--remedies", nargs="+", default=list(REMEDIES), choices=list(REMEDIES))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke check: 120 steps, three runs (healthy-rev-1e-2, spike, nan)")
    parser.add_argument("--testbed-only", action="store_true",
                        help=f"only the testbed's runs ({', '.join(TESTBED)}; their own lengths, seed 0)")
    parser.add_argument("--no-testbed", action="store_true", help="only the tiny-model runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.scenarios = 120, ["healthy-rev-1e-2", "spike", "nan"]
    if args.testbed_only:
        args.scenarios = [s for s in args.scenarios if s in TESTBED] or list(TESTBED)
    elif args.no_testbed:
        args.scenarios = [s for s in args.scenarios if s not in TESTBED]
    if any(s in TESTBED for s in args.scenarios):
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    torch.set_num_threads(1)
    print(f"{args.steps} steps, seeds {args.seeds} (testbed rows: their own length, seed 0); held-out loss at the "
          f"end on 256 test sequences (extra compute: the remedy's own time / the rest of the run)")
    print("| run | seed | " + " | ".join(args.remedies) + " | lossguard's actions (with the net) |")
    print("|---|---|" + "---|" * len(args.remedies) + "---|")
    results: dict[tuple[str, int, str], Result] = {}
    t_start = time.perf_counter()
    for s in args.scenarios:
        spec = SCENARIOS[s]
        for seed in args.seeds[:1] if spec.testbed else args.seeds:
            cells = []
            for r in args.remedies:
                if r not in spec.remedies:
                    cells.append("")
                    continue
                res = results[(s, seed, r)] = run(r, spec, seed, args.steps)
                cell = _loss(res.loss) + (f" ({res.extra:+.1%})" if r != "none" else "")
                if r.startswith("lg") and res.rollbacks:
                    cell += f" rb {res.rollbacks}"
                if res.declined:
                    cell += f" dec {res.declined}"
                cells.append(cell)
            lg = results.get((s, seed, "lg"))
            acted = " ".join(lg.acted) if lg is not None and lg.acted else "-"
            print(f"| {s} | {seed} | " + " | ".join(cells) + f" | {acted} |")
            sys.stdout.flush()
    for (s, seed, r), res in results.items():
        if r in ("skip-step", "zclip", "plateau-cut", "lg-no-net", "lg-trial"):
            print(f"  {s} seed {seed} {r}: {' '.join(res.acted) or '-'}")
    print()
    for line in targets(results, args.seeds):
        print(line)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
