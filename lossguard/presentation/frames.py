"""``lossguard.load_run(RUN_DIR)``: a run as pandas DataFrames, for notebooks.

Works on every log lossguard reads (its own telemetry, ``trainer_state.json``, LLaMA-Factory,
Lightning). Findings are those logged by the callback plus those the detectors find when run over
the samples, so a foreign log gets the same diagnosis as a lossguard one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lossguard.records import Sample
from lossguard.watch.follow import Batch

SAMPLE_COLUMNS = ["step", "loss", "grad_norm", "lr", "epoch", "step_time_s", "tokens", "t"]
FINDING_COLUMNS = ["step", "onset_step", "reason", "severity", "message", "detector", "evidence"]
ACTION_COLUMNS = ["step", "action", "from_step", "to_step", "lr_factor", "reason", "message", "details"]


@dataclass
class RunFrames:
    """One run as tables: one row per step, per finding, per action, per probe, per GPU interval.

    ``source`` names the log that was read (``lossguard``, ``trainer_state``, ``llamafactory`` or
    ``lightning``) and ``source_path`` where it is; ``run`` is the run record (configuration) when
    the log has one.
    """

    samples: pd.DataFrame
    findings: pd.DataFrame
    actions: pd.DataFrame
    probes: pd.DataFrame
    gpu: pd.DataFrame
    evals: pd.DataFrame
    source: str
    source_path: Path
    run: dict[str, Any] | None = None
    preflight: dict[str, Any] | None = None
    status: str = "ok"
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"RunFrames(source={self.source!r}, samples={len(self.samples)}, findings={len(self.findings)}, "
                f"actions={len(self.actions)}, probes={len(self.probes)}, gpu={len(self.gpu)}, status={self.status!r})")


def _samples_frame(samples: list[Sample]) -> pd.DataFrame:
    cols: dict[str, list[Any]] = {c: [] for c in SAMPLE_COLUMNS}
    for s in samples:
        cols["step"].append(s.step)
        cols["loss"].append(s.loss)
        cols["grad_norm"].append(s.grad_norm)
        cols["lr"].append(s.lr)
        cols["epoch"].append(s.epoch)
        cols["step_time_s"].append(s.step_time_s)
        cols["tokens"].append(s.tokens)
        cols["t"].append(s.t)
    df = pd.DataFrame({
        "step": pd.Series(cols["step"], dtype="int64"),
        **{c: pd.Series(cols[c], dtype="float64") for c in SAMPLE_COLUMNS if c not in ("step", "tokens")},
        "tokens": pd.Series(cols["tokens"], dtype="Int64"),
    })[SAMPLE_COLUMNS]
    # duplicated steps (a resumed run re-logging them): the last one wins, as in every reader
    return df.drop_duplicates("step", keep="last").sort_values("step", kind="stable").reset_index(drop=True)


def _gpu_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for rec in records:
        gpus = rec.get("gpus")
        if not isinstance(gpus, list):
            continue
        for i, g in enumerate(gpus):
            if isinstance(g, dict):
                rows.append({"step": rec.get("step"), "t": rec.get("t"), "index": g.get("index", i),
                             **{k: v for k, v in g.items() if k != "index"}})
    return pd.DataFrame(rows)


def load_run(run_dir: str | Path) -> RunFrames:
    """Read a run directory into DataFrames (``samples``, ``findings``, ``actions``, ``probes``, ``gpu``).

    Raises:
        LogReadError: the directory is missing, holds no readable log, or holds several runs.
    """
    from lossguard.watch.live import read_run

    samples: list[Sample] = []
    probes: list[dict[str, Any]] = []
    gpu: list[dict[str, Any]] = []

    def collect(batch: Batch) -> None:
        if batch.reset:
            samples.clear()
            probes.clear()
            gpu.clear()
        samples.extend(batch.samples)
        for rec in batch.records:
            kind = rec.get("kind")
            if kind == "probe":
                probes.append(rec)
            elif kind == "gpu":
                gpu.append(rec)

    live = read_run(run_dir, on_batch=collect)
    findings = pd.DataFrame([{**{k: v for k, v in f.to_record().items() if k != "kind"}} for f in live.findings],
                            columns=FINDING_COLUMNS)
    actions = pd.DataFrame([{k: v for k, v in a.to_record().items() if k != "kind"} for a in live.actions],
                           columns=ACTION_COLUMNS)
    return RunFrames(
        samples=_samples_frame(samples),
        findings=findings.sort_values("step", kind="stable").reset_index(drop=True),
        actions=actions,
        probes=pd.DataFrame(probes).drop(columns=["v", "kind"], errors="ignore"),
        gpu=_gpu_frame(gpu),
        evals=pd.DataFrame(live.evals).drop(columns=["v", "kind"], errors="ignore"),
        source=live.source_kind or "",
        source_path=live.source_path or Path(run_dir),
        run=live.run,
        preflight=live.preflight,
        status=live.status.value,
        notes=list(live.notes),
    )
