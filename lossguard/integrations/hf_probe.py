"""Running the Hessian saddle probe from inside a Trainer run, within a time budget.

The probe runs when the plateau detector fires (``ProbeConfig.on_plateau``) and every
``every_n_steps`` if asked, on training batches kept at the start of the run (the same batches
every time, so probes compare). Its cost is bounded twice: ``max_seconds`` per probe, and a probe
is skipped while probing has already used more than ``max_time_fraction`` of the training time.
In DDP, rank 0 probes and broadcasts the record, so every rank sees the same verdict.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from lossguard.config import ProbeConfig
from lossguard.integrations import dist

logger = logging.getLogger("lossguard")


class TrainerProbe:
    """Decides when to probe, runs ``probes.hessian.probe_model`` and returns the ``probe`` record."""

    def __init__(self, config: ProbeConfig, *, optimizer_kind: str = "adam",
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.config = config
        self.optimizer_kind = optimizer_kind
        self._clock = clock
        self._t_start = clock()
        self.seconds = 0.0
        self.count = 0
        self.warmup_steps = 0
        self.model: Any = None
        self.batches: list[dict[str, Any]] = []

    def begin(self, model: Any, warmup_steps: int) -> None:
        self.model = model
        self.warmup_steps = warmup_steps
        self._t_start = self._clock()

    @property
    def rows_wanted(self) -> int:
        """Sequences to keep from training: ``batch_size`` per group."""
        return self.config.batch_size * self.config.groups if self.config.enabled else 0

    def due(self, step: int) -> bool:
        n = self.config.every_n_steps
        return self.config.enabled and n > 0 and step > 0 and step % n == 0

    def _over_budget(self) -> float | None:
        elapsed = max(self._clock() - self._t_start, 1e-9)
        share = self.seconds / elapsed
        return share if share > self.config.max_time_fraction else None

    def run(self, step: int, lr: float | None, why: str) -> dict[str, Any] | None:
        """Probe now; the ``probe`` record (skips included), identical on every rank."""
        if not self.config.enabled or self.model is None:
            return None
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

        share = self._over_budget()
        if share is not None:
            result: Any = ProbeSkipped(
                "budget", f"probing has used {share:.1%} of training time, over the "
                f"{self.config.max_time_fraction:.0%} budget; probe skipped", step)
        else:
            t0 = self._clock()
            result = probe_model(self.model, self.batches, config=self.config, seed=step, step=step,
                                 warmup_steps=self.warmup_steps)
            self.seconds += self._clock() - t0
            self.count += 1
        record = result.to_record(step=step)
        record["trigger"] = why
        if isinstance(result, CurvatureResult) and lr:
            record["edge_of_stability"] = sharpness_report(result.lambda_max, lr, self.optimizer_kind)
        record["probe_time_share"] = round(self.seconds / max(self._clock() - self._t_start, 1e-9), 4)
        return record
