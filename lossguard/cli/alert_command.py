"""``--on-alert CMD``: the daemon's alert command, split like a shell line but run without a shell.

Nothing from the log is ever interpreted as shell code (the finding goes to the command's stdin);
a command written with shell syntax (``cat >> alerts.log``) is refused with the ``sh -c`` form to
use, rather than run with ``>>`` as an argument and fail where only ``watch.log`` says so.
"""

from __future__ import annotations

import shlex
import shutil

from lossguard.errors import LossguardError


class AlertCommandError(LossguardError):
    """The ``--on-alert`` command cannot be run as given."""


def parse_command(cmd: str) -> list[str]:
    """``--on-alert`` split into argv (no shell); ``AlertCommandError`` when unusable."""
    try:
        argv = shlex.split(cmd)
    except ValueError as err:
        raise AlertCommandError(f"--on-alert {cmd!r}: cannot be parsed ({err})") from None
    if not argv:
        raise AlertCommandError("--on-alert is empty")
    shell = next((a for a in argv[1:] if a[:1] in "|><&;" or a.startswith("2>")), None)
    if shell is not None:
        # ``cat >> file`` would run cat on files named '>>' and 'file', fail, and only say so in watch.log
        raise AlertCommandError(f"--on-alert {cmd!r}: {shell!r} is shell syntax, but the command runs without a shell; "
                          f"wrap it: --on-alert {shlex.quote('sh -c ' + shlex.quote(cmd))}")
    if shutil.which(argv[0]) is None:
        raise AlertCommandError(f"--on-alert: program {argv[0]!r} not found or not executable")
    return argv
