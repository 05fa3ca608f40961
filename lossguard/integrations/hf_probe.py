"""Running the Hessian saddle probe from inside a Trainer run, within a time budget.

The probe runs when the plateau detector fires (``ProbeConfig.on_plateau``) and every
``every_n_steps`` if asked, on training batches kept at the start of the run (the same batches
every time, so probes compare). Its cost is bounded twice: ``max_seconds`` per probe, and all
probes together get at most ``max_time_fraction`` of the run's expected training time
(``max_steps`` x the mean step time so far): each probe's time limit is what is left of that
budget, and a probe with nothing left is skipped. Inside that limit the probe sizes itself
(``probes.hessian.probe_model``): one Hessian-vector product on one training micro-batch costs
about 1.5-2.5 training steps (26M-parameter Llama on CPU), and the probe chooses how many
micro-batches and products fit, or skips as ``too_expensive``. Before any probe has measured a
product, the estimate is ``PRIOR_STEPS`` training micro-batch steps per product (a product takes
two gradients, or one double backward), so a probe that clearly cannot fit costs nothing; after
one, the measured figure is used. In DDP, rank 0 probes and broadcasts the record, so every rank
sees the same verdict. Where the parameters are sharded (FSDP2, DeepSpeed, FSDP1: ``off`` says
why) no probe runs: every rank records the same skip, never a verdict from one rank's shard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from lossguard.config import ProbeConfig
from lossguard.integrations import dist

logger = logging.getLogger("lossguard")

PRIOR_STEPS = 0.75


class TrainerProbe:
    """Decides when to probe, runs ``probes.hessian.probe_model`` and returns the ``probe`` record."""

    def __init__(self, config: ProbeConfig, *, optimizer_kind: str = "adam",
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.config = config
        self.optimizer_kind = optimizer_kind
        self._clock = clock
        self.seconds = 0.0
        self.count = 0
        self.warmup_steps = 0
        self.model: Any = None
        self.batches: list[dict[str, Any]] = []
        self.max_steps = 0
        self._step_seconds = 0.0
        self._steps_timed = 0
        self.micro_batches = 1
        self._product_seconds: float | None = None
        self.off: str | None = None  # why the probe cannot run under this engine (sharded parameters)

    def begin(self, model: Any, warmup_steps: int, max_steps: int, micro_batches: int = 1) -> None:
        """``micro_batches``: training micro-batches per optimizer step (gradient accumulation)."""
        self.model = model
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.micro_batches = max(1, int(micro_batches))

    def product_seconds(self) -> float | None:
        """Seconds of one Hessian-vector product on one micro-batch: measured, or estimated."""
        if self._product_seconds is not None:
            return self._product_seconds
        if self._steps_timed:
            return PRIOR_STEPS * self._step_seconds / self._steps_timed / self.micro_batches
        return None

    def observe_step(self, seconds: float | None) -> None:
        """One training step's duration, for the budget."""
        if seconds is not None and seconds > 0:
            self._step_seconds += seconds
            self._steps_timed += 1

    def budget_left(self) -> float:
        """Seconds of probing still allowed in this run."""
        if not self._steps_timed or self.max_steps <= 0:
            return 0.0
        expected_run = self.max_steps * self._step_seconds / self._steps_timed
        return self.config.max_time_fraction * expected_run - self.seconds

    @property
    def rows_wanted(self) -> int:
        """Sequences to keep from training: ``batch_size`` per group."""
        return self.config.batch_size * self.config.groups if self.config.enabled else 0

    def due(self, step: int) -> bool:
        n = self.config.every_n_steps
        return self.config.enabled and n > 0 and step > 0 and step % n == 0

    def run(self, step: int, lr: float | None, why: str) -> dict[str, Any] | None:
        """Probe now; the ``probe`` record (skips included), identical on every rank."""
        if not self.config.enabled or self.model is None:
            return None
        if self.off is None:
            from lossguard.probes.hessian import sharded_reason

            self.off = sharded_reason(self.model)
        if self.off is not None:  # decided from what every rank knows: no rank runs a probe alone
            from lossguard.probes.hessian import ProbeSkipped

            record = ProbeSkipped("sharded", self.off, step).to_record(step=step)
            record["trigger"] = why
            return record
        record = None
        if dist.rank() == 0:
            record = self._probe(step, lr, why)
        if dist.is_distributed():
            import torch.distributed as tdist

            box = [record]
            tdist.broadcast_object_list(box, src=0)
            record = box[0]
        return record

    def _probe(self, step: int, lr: float | None, why: str) -> dict[str, Any]:
        from lossguard.probes.hessian import CurvatureResult, ProbeSkipped, probe_model, sharpness_report

        left = self.budget_left()
        if left <= 0:
            result: Any = ProbeSkipped(
                "budget", f"probing may use {self.config.max_time_fraction:.0%} of the run's expected training "
                f"time and {self.seconds:.2f} s of it is spent ({max(left, 0.0):.2f} s left); probe skipped", step)
        else:
            t0 = self._clock()
            config = replace(self.config, max_seconds=min(self.config.max_seconds, left))
            result = probe_model(self.model, self.batches, config=config, seed=step, step=step,
                                 warmup_steps=self.warmup_steps, product_seconds=self.product_seconds())
            self.seconds += self._clock() - t0
            self.count += 1
        record = result.to_record(step=step)
        measured = record.get("product_seconds")
        if isinstance(measured, float) and measured > 0 and "hvp" in record:
            self._product_seconds = measured
        record["trigger"] = why
        if isinstance(result, CurvatureResult) and lr:
            record["edge_of_stability"] = sharpness_report(result.lambda_max, lr, self.optimizer_kind)
        record["probe_seconds_total"] = round(self.seconds, 4)
        record["probe_budget_left_s"] = round(self.budget_left(), 4)
        return record
