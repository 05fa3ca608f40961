"""The ``lossguard`` command line: one file per subcommand, registered here.

User mistakes (a wrong path, a corrupt log) raise ``LossguardError``; ``main`` prints them as one
line and exits 2, never with a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer

from lossguard.errors import LossguardError

app = typer.Typer(
    name="lossguard",
    help="Training-dynamics diagnostics and recovery for fine-tuning language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _run(module: str, func: str, **kwargs: Any) -> None:
    """Import a subcommand lazily (keeps ``lossguard --help`` fast) and turn its result into an exit code."""
    mod = importlib.import_module(f"lossguard.cli.{module}")
    code = getattr(mod, func)(**kwargs)
    raise typer.Exit(int(code or 0))


def _register() -> None:
    from lossguard.cli import commands  # noqa: F401  (registers the subcommands on ``app``)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lossguard`` console script."""
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except LossguardError as err:
        typer.echo(f"lossguard: error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
