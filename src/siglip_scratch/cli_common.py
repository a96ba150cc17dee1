"""The CLIs' shared contract: exit codes, one-line errors, --debug, interrupts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import SiglipScratchError

__all__ = ["EXIT_FAIL", "EXIT_OK", "EXIT_USAGE", "run"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def run(
    body: Callable[[argparse.Namespace], int],
    args: argparse.Namespace,
    *,
    on_interrupt: Callable[[KeyboardInterrupt], tuple[str, int]] = lambda exc: ("interrupted", 130),
) -> int:
    """Run a CLI body: a `SiglipScratchError` becomes ``error: <message>`` on stderr and exit 2
    (the traceback only with ``--debug``); Ctrl-C (or a signal turned into KeyboardInterrupt)
    becomes the message and exit code ``on_interrupt`` gives."""
    from .hub import quiet_hub_logs

    quiet_hub_logs()
    try:
        return body(args)
    except SiglipScratchError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        message, code = on_interrupt(exc)
        print(f"error: {message}", file=sys.stderr)
        return code
