"""``lossguard gpu-report``: per-GPU utilization, what keeps the GPUs idle, and what to do.

Samples every GPU on the machine for ``--seconds`` (or replays a recorded timeline, or reads a
lossguard run's ``gpu`` records), prints a table and the diagnoses. No driver or no GPU is not an
error: one line saying so, exit code 0.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from lossguard.errors import LossguardError
from lossguard.gpu.diagnosis import UTIL_MEANS, Diagnosis, GpuContext, diagnose
from lossguard.gpu.nvml import NvmlUnavailable, RealNvmlBackend
from lossguard.gpu.stats import DeviceStats, ProcessStats, device_stats, process_stats
from lossguard.gpu.timeline import Timeline


def command(
    seconds: Annotated[float, typer.Option("--seconds", help="How long to sample every GPU.")] = 10,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between samples.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    record: Annotated[str | None, typer.Option("--record", help="Save the sampled timeline to this file.")] = None,
    replay: Annotated[str | None, typer.Option("--replay", help="Diagnose a saved timeline instead of sampling.")] = None,
    run: Annotated[str | None, typer.Option("--run", help="Summarise the gpu records of a lossguard run directory.")] = None,
) -> int:
    """Per-GPU utilization, memory, power, clocks and processes, with diagnoses and advice."""
    if replay is not None and run is not None:
        raise LossguardError("--replay and --run cannot be combined: pick one source")
    if record is not None and (replay is not None or run is not None):
        raise LossguardError("--record saves a live sampling; it cannot be combined with --replay or --run")
    context = GpuContext()
    n_records: int | None = None
    if run is not None:
        timeline, context, n_records = _from_run(run)
        if timeline is None:
            return _nothing(as_json, f"no gpu records in {run} (GPU sampling was off, or no GPU was found "
                                     "during training)", None, interval)
    elif replay is not None:
        timeline = Timeline.load(replay)
        if timeline.nvml_error is not None:
            return _nothing(as_json, f"no NVIDIA GPU found (NVML: {timeline.nvml_error}) when {replay} was recorded",
                            timeline.nvml_error, timeline.interval_s)
    else:
        if not seconds > 0 or not interval > 0:
            raise LossguardError(f"--seconds {seconds} and --interval {interval} must both be > 0")
        try:
            timeline = _sample_live(seconds, interval, quiet=as_json)
        except NvmlUnavailable as err:
            if record is not None:
                Timeline(interval, [], [], nvml_error=err.reason).save(record)
            return _nothing(as_json, str(err), err.reason, interval)
        if record is not None:
            timeline.save(record)
    stats = device_stats(timeline)
    procs = process_stats(timeline)
    found = diagnose(
        timeline,
        world_size=context.world_size,
        parallel_mode=context.parallel_mode,
        hf_device_map=context.hf_device_map,
    )
    if as_json:
        out: dict[str, Any] = {
            "devices": [st.to_dict(series=False) for st in stats],
            "processes": [p.to_dict() for p in procs],
            "diagnoses": [d.to_dict() for d in found],
            "n_samples": len(timeline.samples),
            "interval_s": timeline.interval_s,
        }
        if n_records is not None:
            out["n_records"] = n_records
        typer.echo(json.dumps(out, allow_nan=False))
    else:
        _print_report(stats, procs, found, len(timeline.samples), timeline.interval_s, record)
    return 0


def _nothing(as_json: bool, message: str, nvml_error: str | None, interval: float) -> int:
    """No GPU to report on: one line, or with ``--json`` an empty report that still parses (exit 0)."""
    if not as_json:
        typer.echo(message)
        return 0
    typer.echo(message, err=True)
    typer.echo(json.dumps({"devices": [], "processes": [], "diagnoses": [], "n_samples": 0, "interval_s": interval,
                           "nvml_error": nvml_error, "message": message}))
    return 0


def _sample_live(seconds: float, interval: float, *, quiet: bool) -> Timeline:
    with RealNvmlBackend() as backend:
        devices = backend.devices()
        n = max(1, round(seconds / interval))
        if not quiet:
            typer.echo(f"sampling {len(devices)} GPU(s) every {interval:g} s for {n * interval:g} s ...", err=True)
        samples = []
        start = time.monotonic()
        try:
            for k in range(n):
                samples.append(backend.sample())
                delay = start + (k + 1) * interval - time.monotonic()
                if delay > 0 and k + 1 < n:
                    time.sleep(delay)
        except KeyboardInterrupt:
            typer.echo(f"interrupted: reporting the {len(samples)} sample(s) taken", err=True)
        return Timeline(interval, devices, samples)


def _from_run(run_dir: str) -> tuple[Timeline | None, GpuContext, int]:
    from lossguard.gpu.sampler import normalize_parallel_mode, timeline_from_records
    from lossguard.telemetry import open_run

    log = open_run(run_dir)
    records = [r for r in log.gpu if isinstance(r, dict)]
    timeline = timeline_from_records(records)
    if not timeline.samples:
        return None, GpuContext(), len(records)
    ctx_dict: dict[str, Any] = {}
    for r in records:
        if isinstance(r.get("context"), dict):
            ctx_dict = dict(r["context"])
    run_rec = log.run or {}
    if "world_size" not in ctx_dict and isinstance(run_rec.get("world_size"), int):
        ctx_dict["world_size"] = run_rec["world_size"]
    if "parallel_mode" not in ctx_dict and run_rec.get("parallel_mode") is not None:
        ctx_dict["parallel_mode"] = normalize_parallel_mode(
            run_rec["parallel_mode"], ctx_dict.get("world_size"), ctx_dict.get("hf_device_map")
        )
    return timeline, GpuContext.from_dict(ctx_dict), len(records)


def _num(x: float | None, unit: str = "", nd: int = 0) -> str:
    return "N/A" if x is None else f"{x:.{nd}f}{unit}"


def _ratio(x: float | None, limit: float | None, unit: str) -> str:
    if x is None:
        return "N/A"
    return f"{x:.0f}/{limit:.0f}{unit}" if limit else f"{x:.0f}{unit}"


def _print_report(
    stats: list[DeviceStats], procs: list[ProcessStats], found: list[Diagnosis], n: int, interval: float,
    record: str | None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    table = Table(title=f"GPU utilization over {n} sample(s), {interval:g} s apart")
    for col in ("GPU", "name", "util p5/p50/p95", "SM active", "memory MiB", "power W", "SM clock MHz", "temp C",
                "throttle"):
        table.add_column(col, no_wrap=col != "name")
    for st in stats:
        util = "N/A" if st.util_p50 is None else f"{st.util_p5:.0f}/{st.util_p50:.0f}/{st.util_p95:.0f}%"
        reasons = [r for r in st.throttle_reasons if r != "gpu_idle"]
        table.add_row(
            str(st.index) + (" (MIG)" if st.mig else ""),
            st.name or "N/A",
            util,
            _num(st.sm_active_mean, "%"),
            _ratio(st.memory_used_mib, st.memory_total_mib, ""),
            _ratio(st.power_w, st.power_limit_w, ""),
            _ratio(st.sm_clock_mhz, st.sm_clock_max_mhz, ""),
            _num(st.temp_c),
            ", ".join(reasons) or "-",
        )
    console.print(table)
    console.print(f"{UTIL_MEANS}; N/A: not reported by the driver (MIG, unsupported field).")
    if procs:
        pt = Table(title="processes")
        for col in ("PID", "name", "GPU", "memory MiB"):
            pt.add_column(col)
        for p in procs:
            pt.add_row(str(p.pid), p.name or "?", str(p.gpu_index), _num(p.used_memory_mib))
        console.print(pt)
    if not found:
        console.print("No diagnosis: the GPUs look well used.")
    for d in found:
        console.print(f"[bold]{d.severity.value}[/bold] {d.kind.value}: {d.message}", markup=True, highlight=False)
        console.print(f"  advice: {d.advice}", markup=False, highlight=False)
        console.print(f"  evidence: {json.dumps(d.evidence)}", markup=False, highlight=False)
    if record is not None:
        console.print(f"timeline saved to {Path(record)}", markup=False, highlight=False)


def main() -> None:
    """``python -m lossguard.cli.gpu_report``: the subcommand on its own."""
    import functools
    import sys

    @functools.wraps(command)
    def entry(*args: Any, **kwargs: Any) -> None:
        try:
            code = command(*args, **kwargs)
        except LossguardError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        raise typer.Exit(code)

    app = typer.Typer(add_completion=False)
    app.command()(entry)
    sys.exit(app())


if __name__ == "__main__":
    main()
