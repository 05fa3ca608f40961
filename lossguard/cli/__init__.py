"""The ``lossguard`` command line: one file per subcommand, registered here.

User mistakes (a wrong path, a corrupt log) raise ``LossguardError``; ``main`` prints them as one
line and exits 2, never with a traceback.
"""

from __future__ import annotations

import sys

import typer

from lossguard.cli.typer_app import app
from lossguard.errors import LossguardError

__all__ = ["app", "main"]


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
