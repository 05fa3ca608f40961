"""Typer signatures of the subcommands; each forwards to its own module in ``lossguard/cli``."""

from __future__ import annotations

from typing import Annotated

import typer

from lossguard.cli.typer_app import app, run_subcommand

RunDir = Annotated[str, typer.Argument(help="A Trainer output_dir (e.g. ./qwen-qlora-it).")]


def _print_version(value: bool) -> None:
    if value:
        from lossguard import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the lossguard version and exit.")] = False,
) -> None:
    pass


@app.command()
def watch(
    run_dir: RunDir,
    once: Annotated[bool, typer.Option("--once", help="Analyse what is there now, print, exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object (implies --once).")] = False,
    fail_on: Annotated[str | None, typer.Option(
        help="Exit 1 at this level (implies --once): info (any finding), recovered (any trouble, even "
             "handled), warning or critical (trouble still open); a log with no samples always fails. "
             "With --daemon: the alert level (info|warning|critical).")] = None,
    daemon: Annotated[bool, typer.Option("--daemon", help="Detach: alerts, report, pidfile.")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the daemon watching RUN_DIR.")] = False,
    on_alert: Annotated[str | None, typer.Option(
        help="Daemon: command run per alert, the finding as JSON on stdin. Split like a shell line but run "
             "without a shell: for pipes or redirections wrap it, e.g. \"sh -c 'cat >> alerts.log'\".")] = None,
    refresh: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    report_every: Annotated[float, typer.Option(help="Daemon: seconds between report.html refreshes.")] = 60.0,
) -> None:
    """Watch a run: live dashboard, one-shot analysis (--once) or background daemon (--daemon)."""
    run_subcommand("watch", "command", run_dir=run_dir, once=once, as_json=as_json, fail_on=fail_on,
                   daemon=daemon, stop=stop, on_alert=on_alert, refresh=refresh, report_every=report_every)


@app.command()
def report(
    run_dir: RunDir,
    output: Annotated[str | None, typer.Option("-o", "--output", help="HTML file to write.")] = None,
    shared_plotly: Annotated[bool, typer.Option(
        "--shared-plotly", help="Put plotly.js (~4.7 MB) in one file beside the report, shared by every report in "
                                "that folder, instead of inside each page (still offline; keep the file with the page).")
    ] = False,
) -> None:
    """Write a self-contained HTML report of a run (works offline)."""
    run_subcommand("report", "command", run_dir=run_dir, output=output, shared_plotly=shared_plotly)


@app.command()
def export(
    run_dir: RunDir,
    output: Annotated[str, typer.Option("-o", "--output", help="CSV file to write; - for stdout.")] = "lossguard-samples.csv",
) -> None:
    """Export a run's per-step samples as CSV."""
    run_subcommand("export", "command", run_dir=run_dir, output=output)


@app.command("gpu-report")
def gpu_report(
    seconds: Annotated[float, typer.Option(help="How long to sample.")] = 10.0,
    interval: Annotated[float, typer.Option(help="Seconds between samples.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    record: Annotated[str | None, typer.Option(help="Save the sampled timeline to FILE.")] = None,
    replay: Annotated[str | None, typer.Option(help="Diagnose a saved timeline FILE.")] = None,
    run: Annotated[str | None, typer.Option(help="Summarise a lossguard run's GPU records.")] = None,
) -> None:
    """Per-GPU utilization, why a GPU idles, and what to change."""
    run_subcommand("gpu_report", "command", seconds=seconds, interval=interval, as_json=as_json, record=record,
                   replay=replay, run=run)


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A checkpoint-* directory or a run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What a checkpoint holds, and what swapping adapters needs (never unpickles anything)."""
    run_subcommand("inspect", "command", path=path, as_json=as_json)


@app.command()
def demo(
    output_dir: Annotated[str, typer.Option(help="Where the demo run is written.")] = "demo-run",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 600,
) -> None:
    """Fine-tune a tiny model on CPU with LossGuard attached, then summarise."""
    run_subcommand("demo", "command", output_dir=output_dir, steps=steps)


@app.command()
def version() -> None:
    """Print the lossguard version."""
    from lossguard import __version__

    typer.echo(__version__)
