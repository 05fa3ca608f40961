"""The safety net's judge inside a training run: its fixed evaluation batches and the scores the engine asks for.

``Judge`` is what the integrations hand to ``Guard.decide(..., judge=...)``: called, it scores
the model as it is now (``recovery.judge.score_model``: forward only, eval mode, nothing else
changed) and, in a distributed run, pools every rank's units (unit i of each rank's batches is
one unit; losses token-weighted), so every rank gets the same scores and reaches the same verdict.
A failure on any rank gives None on every rank: the verdict is then not taken (the recovery stays,
unjudged), and training goes on.

The batches are fixed at the first call, from a source set aside at train begin: a slice of the
Trainer's evaluation set when it has one (``eval_batches``), else training batches kept during
the first steps (the Trainer callback's ``StepCapture.kept``, or ``TrainingRows`` for a plain
loop). Each rank takes ``ceil(judge_sequences / world size)`` sequences.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lossguard.config import RecoveryConfig
from lossguard.integrations import dist
from lossguard.recovery.judge import Batch, rows, score_model, take_rows
from lossguard.recovery.snapshot import rng_state, set_rng_state
from lossguard.recovery.verdict import Scores

logger = logging.getLogger("lossguard")


def per_rank(sequences: int) -> int:
    """This rank's share of the judge's ``sequences``."""
    return math.ceil(sequences / dist.world_size())


class Judge:
    """Scores ``model`` on fixed evaluation batches; ``seconds`` is the time it took, all calls together."""

    def __init__(self, model: Any, source: Sequence[Batch] | Callable[[], Sequence[Batch]], sequences: int) -> None:
        self.model = getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) \
            else model
        self._source = source
        self.sequences = per_rank(sequences)
        self.batches: list[dict[str, Any]] | None = None
        self.seconds = 0.0
        self.calls = 0
        self._warned = False

    @property
    def rows(self) -> int:
        return sum(rows(b) for b in self.batches or ())

    def _fixed(self) -> list[dict[str, Any]]:
        if self.batches is None:
            source = self._source() if callable(self._source) else self._source
            self.batches = take_rows(list(source), self.sequences)
        return self.batches

    def __call__(self) -> Scores | None:
        t0 = time.perf_counter()
        try:
            local: Scores | None = score_model(self.model, self._fixed())
        except Exception as err:  # lossguard must never take training down
            if not self._warned:
                self._warned = True
                logger.warning("lossguard: the safety net could not score the model (%s: %s)", type(err).__name__, err)
            local = None
        try:
            return pool(local)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - t0


def pool(local: Scores | None) -> Scores | None:
    """Every rank's scores as one: unit i pooled over the ranks (token-weighted); None everywhere
    when any rank has none. Not distributed: ``local`` itself."""
    if not dist.is_distributed():
        return local
    device = dist.device()
    n = -1 if local is None else len(local.losses)
    count = torch.tensor([n], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
    n = int(count.item())
    if n <= 0 or local is None:
        return None
    buf = torch.tensor([[v * w for v, w in zip(local.losses[:n], local.weights[:n])], list(local.weights[:n])],
                       dtype=torch.float64, device=device)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    sums, weights = buf.tolist()
    return Scores.of([s / w if w > 0 else 0.0 for s, w in zip(sums, weights)], weights)


def eval_batches(trainer: Any, sequences: int) -> list[dict[str, Any]]:
    """The first sequences of ``trainer``'s evaluation set as its evaluation data loader gives them
    (this rank's shard in a distributed run), on CPU; none when it has no evaluation set. The
    RNG states are put back after (a prepared loader may touch them)."""
    dataset = getattr(trainer, "eval_dataset", None)
    if dataset is None:
        return []
    name = next(iter(dataset)) if isinstance(dataset, dict) else None
    state = rng_state()
    try:
        loader = trainer.get_eval_dataloader(name) if name is not None else trainer.get_eval_dataloader()
        kept: list[dict[str, Any]] = []
        left = per_rank(sequences)
        for batch in loader:
            kept.extend(take_rows([batch], left))
            left = per_rank(sequences) - sum(rows(b) for b in kept)
            if left <= 0:
                break
        return kept
    finally:
        set_rng_state(state)


def trainer_judge(trainer: Any, model: Any, config: RecoveryConfig, capture: Any) -> Judge | None:
    """The Trainer callback's judge (None without the safety net): on the first sequences of the
    Trainer's evaluation set, set aside now, else on the first training rows ``capture`` (a
    ``StepCapture``) keeps, whose ``keep_rows`` it raises to what the judge needs."""
    if not (config.enabled and config.safety_net):
        return None
    batches = eval_batches(trainer, config.judge_sequences) if trainer is not None else []
    if batches:
        return Judge(model, batches, config.judge_sequences)
    capture.keep_rows = max(capture.keep_rows, per_rank(config.judge_sequences))
    return Judge(model, capture.kept, config.judge_sequences)


class TrainingRows:
    """Keeps the first ``n`` training sequences a model is called with (a forward pre-hook that
    removes itself once it has them): the plain loop's judge batches when none are given."""

    def __init__(self, model: Any, n: int) -> None:
        self.n = n
        self.kept: list[dict[str, Any]] = []
        self._rows = 0
        self._handle: Any = model.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled()) or "labels" not in kwargs:
            return
        taken = take_rows([{k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}], self.n - self._rows)
        self.kept.extend(taken)
        self._rows += sum(rows(b) for b in taken)
        if self._rows >= self.n:
            self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
