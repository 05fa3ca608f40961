"""The Typer application the subcommands register on, and the lazy runner they forward to."""

from __future__ import annotations

import importlib
from typing import Any

import typer

app = typer.Typer(
    name="lossguard",
    help="Training-dynamics diagnostics and recovery for fine-tuning language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def run_subcommand(module: str, func: str, **kwargs: Any) -> None:
    """Import a subcommand lazily (keeps ``lossguard --help`` fast) and turn its result into an exit code."""
    mod = importlib.import_module(f"lossguard.cli.{module}")
    code = getattr(mod, func)(**kwargs)
    raise typer.Exit(int(code or 0))
