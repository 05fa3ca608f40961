"""Fine-tuning scenarios on the testbed base: each a real ``Trainer`` run of a few seconds to tens
of seconds, healthy or troubled for a real reason, with its good outcome measured without lossguard.

    from lossguard.testing.testbed.scenarios import SCENARIOS, run_scenario
    result = run_scenario("sft-lora-1epoch", out_dir, callbacks=[LossGuard()])

``SCENARIOS[name].build()`` gives the pieces (model, data, collator, arguments) for anyone who
wants to assemble the ``Trainer`` themselves; ``make_trainer`` assembles it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lossguard.testing.testbed import tasks as T
from lossguard.testing.testbed.base import load_base
from lossguard.testing.tiny import ALL_LINEAR, PadCollator, eval_loss, training_args


@dataclass
class Pieces:
    """What a user hands the ``Trainer``, plus what the scenario knows about its data."""

    model: Any
    tokenizer: Any
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    collator: Any
    args: dict[str, Any]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """A named run: what it is, what lossguard should make of it, what a good outcome is."""

    name: str
    expected: str  # a corpus label: healthy, staircase, premature_plateau, divergence, spike, nonfinite
    description: str
    good_outcome: str
    build: Callable[[], Pieces]


@dataclass
class Result:
    """A finished scenario run: its per-step log, the outcome measured without lossguard, timing."""

    name: str
    steps: list[int]
    losses: list[float]
    grad_norms: list[float]
    epochs: list[float]
    outcome: dict[str, Any]
    wall_s: float
    trainer: Any


class CulpritSteps:
    """Records the optimizer steps whose training batch held a known bad row (by its token ids),
    from a forward pre-hook on the model: only forwards in train mode with gradients count, so
    batches that other callbacks draw for their own measurements do not."""

    def __init__(self, rows: Sequence[Sequence[int]]) -> None:
        self.rows = [torch.tensor(list(r)) for r in rows]
        self.steps: list[int] = []
        self.state: Any = None

    def attach(self, trainer: Any) -> None:
        from transformers import TrainerCallback

        tracker = self

        class _Step(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                tracker.state = state

        trainer.add_callback(_Step())
        trainer.model.register_forward_pre_hook(self._look, with_kwargs=True)

    def _look(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is None or not module.training or not torch.is_grad_enabled() or self.state is None:
            return
        step = self.state.global_step + 1
        for row in self.rows:
            n = len(row)
            if ids.shape[1] >= n and bool((ids[:, :n] == row).all(-1).any()) and step not in self.steps:
                self.steps.append(step)


def _lora(model: Any, r: int = 8, alpha: int = 16, seed: int = 0) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the adapter's initialisation, whatever ran before in this process
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _encode(tok: Any, pairs: Sequence[T.Pair], **kw: Any) -> list[dict[str, Any]]:
    return [T.encode(tok, p, **kw) for p in pairs]


N_EVAL = 64


def _sft(*, lora: bool, n_train: int, lr: float, epochs: float = 1, mask: str = "prompt",
         corrupt_at: Sequence[int] = (), seed: int = 0, batch: int = 8, half: bool = False,
         scheduler: str = "linear") -> Pieces:
    base = load_base()
    tok = base.tokenizer
    pairs = T.instruction_pairs(n_train + N_EVAL, seed=seed)
    train_pairs, eval_pairs = pairs[:n_train], pairs[n_train:]
    train = _encode(tok, train_pairs, mask=mask)
    for k, i in enumerate(corrupt_at):
        train[i] = T.foreign_tokens(train[i], len(tok), seed=seed + k)
    model = _lora(base.model, seed=seed) if lora else base.model
    if half:
        model = model.half()
    notes = {"culprits": CulpritSteps([train[i]["input_ids"] for i in corrupt_at])} if corrupt_at else {}
    return Pieces(model, tok, train, _encode(tok, eval_pairs), PadCollator(tok.pad_token_id),
                  dict(learning_rate=lr, num_train_epochs=epochs, per_device_train_batch_size=batch,
                       lr_scheduler_type=scheduler, warmup_steps=0, max_grad_norm=1.0, seed=seed),
                  notes)


def _classify(*, lora: bool, n_train: int, lr: float, shuffled_labels: bool, seed: int = 0) -> Pieces:
    base = load_base()
    tok = base.tokenizer
    pairs = T.classification_pairs(n_train + 2 * N_EVAL, seed=seed)
    train_pairs, eval_pairs = pairs[:n_train], pairs[n_train:]
    if shuffled_labels:
        train_pairs = T.misaligned(train_pairs, seed=seed)
    model = _lora(base.model, seed=seed) if lora else base.model
    return Pieces(model, tok, _encode(tok, train_pairs, eos=False), _encode(tok, eval_pairs, eos=False),
                  PadCollator(tok.pad_token_id),
                  dict(learning_rate=lr, num_train_epochs=1, per_device_train_batch_size=8, warmup_steps=0,
                       lr_scheduler_type="linear", seed=seed),
                  {"prior_entropy": T.prior_entropy(), "eval_pairs": eval_pairs})


def _dpo(*, n_train: int, lr: float, beta: float = 0.1, rejected: str = "shuffled",
         scheduler: str = "linear", seed: int = 0) -> Pieces:
    """Preference pairs for TRL's ``DPOTrainer`` (LoRA from a ``peft_config``: the reference is
    the base with the adapter off). ``train``/``eval`` hold prompt/chosen/rejected rows."""
    from peft import LoraConfig

    base = load_base()
    triples = T.preference_pairs(n_train + N_EVAL, seed=seed, rejected=rejected)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples]
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(ALL_LINEAR),
                             task_type="CAUSAL_LM")
    return Pieces(base.model, base.tokenizer, rows[:n_train], rows[n_train:], None,
                  dict(learning_rate=lr, num_train_epochs=1, per_device_train_batch_size=8,
                       lr_scheduler_type=scheduler, warmup_steps=0, max_grad_norm=1.0, seed=seed),
                  {"trainer": "dpo", "beta": beta, "peft_config": peft_config, "seed": seed})


SCENARIOS: dict[str, Scenario] = {}


def _register(name: str, expected: str, description: str, good_outcome: str, build: Callable[[], Pieces]) -> None:
    SCENARIOS[name] = Scenario(name, expected, description, good_outcome, build)


_register(
    "sft-lora-1epoch", "healthy",
    "LoRA (r=8, all linear layers) on 800 instruction pairs, one epoch, LR 1e-2 decaying linearly.",
    "held-out answer loss below the base model's (5.57 -> about 4.85)",
    lambda: _sft(lora=True, n_train=800, lr=1e-2))
_register(
    "sft-full-1epoch", "healthy",
    "Full fine-tune on the same 800 pairs, one epoch, LR 1e-3 decaying linearly: a fast drop in "
    "the first tenth, then a slow tail.",
    "held-out answer loss below the base model's (5.57 -> about 4.67)",
    lambda: _sft(lora=False, n_train=800, lr=1e-3))
_register(
    "sft-full-3epoch", "staircase",
    "Full fine-tune on 240 instruction pairs for three epochs, LR 2e-3 decaying linearly: the loss "
    "steps down at each epoch boundary as the model meets examples it has seen.",
    "held-out answer loss below the base model's (it starts to overfit in the third epoch)",
    lambda: _sft(lora=False, n_train=240, lr=2e-3, epochs=3))
_register(
    "lr-too-high", "divergence",
    "sft-lora-1epoch at a constant LR of 6e-2 (6x): the loss jumps within a few steps and stays "
    "above where it started.",
    "none at this LR: sft-lora-1epoch is the good outcome",
    lambda: _sft(lora=True, n_train=800, lr=6e-2, scheduler="constant"))
_register(
    "classify-healthy", "healthy",
    "Full fine-tune on an imbalanced 4-class task (the kind of a real function-body line: set 70%, "
    "return 15%, if 10%, raise 5%), 1600 lines, LR 1e-3 decaying linearly; the answer is one label token.",
    "held-out loss far below the label-prior entropy (0.914 nats), accuracy above the majority share",
    lambda: _classify(lora=False, n_train=1600, lr=1e-3, shuffled_labels=False))
_register(
    "classify-collapse", "premature_plateau",
    "The same run with the labels shuffled apart from their lines (a data pipeline bug): only the "
    "label frequencies can be learned, so the loss sits at the label-prior entropy.",
    "none with this data: classify-healthy is the good outcome; a rollback cannot help",
    lambda: _classify(lora=False, n_train=1600, lr=1e-3, shuffled_labels=True))
_register(
    "masked-wrongly", "premature_plateau",
    "sft-lora-1epoch with the mask inverted (the prompt learned, the answer masked): the loss falls "
    "like a healthy curve while the task is not learned at all.",
    "none with this data: the held-out answer loss does not improve",
    lambda: _sft(lora=True, n_train=800, lr=1e-2, mask="answer"))
_register(
    "corrupted-examples", "spike",
    "sft-lora-1epoch with 3 of 800 rows tokenized for another model (a foreign shard merged in: 200 "
    "answer tokens that are random to this model): a loss spike at each batch that holds one; the "
    "collator records which steps those are.",
    "as sft-lora-1epoch, with spikes at exactly the culprit steps",
    lambda: _sft(lora=True, n_train=800, lr=1e-2, corrupt_at=(150, 400, 650)))
_register(
    "fp16-overflow", "nonfinite",
    "sft-full-3epoch with the model loaded in float16 (torch_dtype=torch.float16) and trained without "
    "mixed precision: AdamW's eps (1e-8) and small second moments round to 0 in half precision, an "
    "update overflows to inf and the weights turn non-finite within a few steps; the Trainer then logs "
    "loss 0.0 and grad_norm nan (its nan/inf filter hides the loss).",
    "finite loss: the same run in float32 is sft-full-3epoch",
    lambda: _sft(lora=False, n_train=240, lr=2e-3, epochs=3, half=True))

_register(
    "dpo-lora", "healthy",
    "TRL's DPOTrainer, LoRA r=8 on all linear layers (the reference: the base, adapter off), 200 "
    "preference pairs (a signature; chosen its docstring's first line, rejected the same words "
    "shuffled), beta 0.1, LR 1e-2 decaying linearly: the DPO loss starts at ln 2 = 0.693 and falls.",
    "held-out preference accuracy (the chosen answer's implicit reward above the rejected's) far "
    "above 0.5, held-out DPO loss far below ln 2",
    lambda: _dpo(n_train=200, lr=1e-2))
_register(
    "dpo-same-pair", "premature_plateau",
    "dpo-lora with rejected = chosen (both columns filled from one field): the DPO loss is ln 2 "
    "whatever the weights and its gradient is zero, so nothing is learned.",
    "none with this data: dpo-lora is the good outcome",
    lambda: _dpo(n_train=200, lr=1e-2, rejected="same"))
_register(
    "dpo-lr-too-high", "divergence",
    "dpo-lora at a constant LR of 5e-2 (5x): the loss climbs above ln 2 within a few steps and stays "
    "there; the policy ends up preferring the shuffled answers.",
    "none at this LR: dpo-lora is the good outcome",
    lambda: _dpo(n_train=200, lr=5e-2, scheduler="constant"))


def make_trainer(pieces: Pieces, output_dir: str, *, callbacks: Sequence[Any] = (), **overrides: Any) -> Any:
    """A real ``Trainer`` over ``pieces`` (TRL's ``DPOTrainer`` for a preference scenario), logging
    every step, quiet; ``overrides`` win."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    kw = dict(pieces.args, logging_steps=1, max_steps=-1)
    kw.update(overrides)
    if pieces.notes.get("trainer") == "dpo":
        trainer = _dpo_trainer(pieces, output_dir, callbacks, kw)
    else:
        trainer = Trainer(model=pieces.model, args=training_args(output_dir, **kw), train_dataset=pieces.train,
                          eval_dataset=pieces.eval, data_collator=pieces.collator, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    if "culprits" in pieces.notes:
        pieces.notes["culprits"].attach(trainer)
    return trainer


def _dpo_trainer(pieces: Pieces, output_dir: str, callbacks: Sequence[Any], kw: dict[str, Any]) -> Any:
    """TRL's ``DPOTrainer`` as a user builds it on CPU (no bf16, no gradient checkpointing)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    base = dict(output_dir=output_dir, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, bf16=False, gradient_checkpointing=False, max_length=64,
                beta=pieces.notes["beta"])
    base.update(kw)
    torch.manual_seed(pieces.notes["seed"])  # the adapter's initialisation, whatever ran before
    return DPOTrainer(model=pieces.model, args=DPOConfig(**base), train_dataset=Dataset.from_list(pieces.train),
                      eval_dataset=Dataset.from_list(pieces.eval), processing_class=pieces.tokenizer,
                      peft_config=pieces.notes["peft_config"], callbacks=list(callbacks))


@torch.no_grad()
def accuracy(model: Any, data: Sequence[dict[str, Any]], collator: Any) -> float:
    """Share of examples whose every answer token is the argmax (one token for classification)."""
    was = model.training
    model.eval()
    right = 0
    for i in range(0, len(data), 32):
        batch = collator(list(data[i:i + 32]))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        pred, gold = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        keep = gold != T.IGNORE
        right += int(((pred == gold) | ~keep).all(-1).sum())
    model.train(was)
    return right / max(len(data), 1)


def preference_outcome(trainer: Any) -> dict[str, float]:
    """Held-out DPO loss, preference accuracy (share of pairs whose chosen answer's implicit
    reward beats the rejected's) and mean reward margin, from TRL's own evaluation."""
    m = trainer.evaluate()
    return {"eval_loss": float(m["eval_loss"]), "accuracy": float(m["eval_rewards/accuracies"]),
            "margin": float(m["eval_rewards/margins"])}


def run_scenario(name: str, output_dir: str, *, callbacks: Sequence[Any] = (), **overrides: Any) -> Result:
    """Build, train and measure one scenario (``SCENARIOS[name]``)."""
    scenario = SCENARIOS[name]
    pieces = scenario.build()
    dpo = pieces.notes.get("trainer") == "dpo"
    eval_collator = None if dpo else PadCollator(pieces.tokenizer.pad_token_id)
    before = None if dpo else eval_loss(pieces.model, pieces.eval, eval_collator)
    trainer = make_trainer(pieces, output_dir, callbacks=callbacks, **overrides)
    if dpo:  # the policy starts as the reference: loss ln 2, no margin (measured, not assumed),
        for cb in callbacks:  # with the caller's callbacks out of the way: the run starts after it
            trainer.remove_callback(cb)
        start = preference_outcome(trainer)
        for cb in callbacks:
            trainer.add_callback(cb)
        before = start["eval_loss"]
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    rows = [r for r in trainer.state.log_history if "loss" in r and "step" in r]
    outcome: dict[str, Any] = {"eval_loss_before": before}
    if dpo:
        end = preference_outcome(trainer)
        outcome.update(eval_loss_after=end["eval_loss"], preference_accuracy_before=start["accuracy"],
                       preference_accuracy=end["accuracy"], reward_margin=end["margin"])
    else:
        outcome["eval_loss_after"] = eval_loss(pieces.model, pieces.eval, eval_collator)
    if "prior_entropy" in pieces.notes:
        outcome["prior_entropy"] = pieces.notes["prior_entropy"]
        outcome["accuracy"] = accuracy(pieces.model, pieces.eval, eval_collator)
        outcome["majority_share"] = T.PRIOR[0]
    if "culprits" in pieces.notes:
        outcome["culprit_steps"] = sorted(pieces.notes["culprits"].steps)
    losses = [float(r["loss"]) for r in rows]
    grad_norms = [float(r.get("grad_norm", "nan")) for r in rows]
    bad = [int(r["step"]) for r, v, g in zip(rows, losses, grad_norms)
           if not math.isfinite(v) or ("grad_norm" in r and not math.isfinite(g))]
    if bad:
        outcome["first_nonfinite_step"] = bad[0]
    return Result(name, [int(r["step"]) for r in rows], losses, grad_norms,
                  [float(r.get("epoch", 0.0)) for r in rows], outcome, wall, trainer)
