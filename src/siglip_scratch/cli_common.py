"""The CLIs' shared contract: exit codes, one-line errors, --debug, interrupts."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable

from .errors import SiglipScratchError

__all__ = ["EXIT_FAIL", "EXIT_INTERNAL", "EXIT_OK", "EXIT_USAGE", "OneLineParser", "parse", "run"]

# 0 success; 1 the check failed (parity, golden, --verify); 2 a usage or input error (the user's to fix);
# 3 an internal error (ours: a bug to report). docs/ERRORS.md lists them too.
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: <what> (<prog> --help lists the options)``), exit 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message}{self._suggestion(message)} ({self.prog} --help lists the options)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    def _suggestion(self, message: str) -> str:
        """``; did you mean --candidate?`` for a misspelt flag (argparse before 3.14 offers none)."""
        if not message.startswith("unrecognized arguments: "):
            return ""
        known = [o for a in self._actions for o in a.option_strings]
        for word in message.removeprefix("unrecognized arguments: ").split():
            flag = word.split("=", 1)[0]
            if flag.startswith("-"):
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                if close:
                    return f"; did you mean {close[0]}?"
        return ""


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """``parser.parse_args(argv)``, or the exit code when it exits (2 on a usage error, 0 for --help)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def run(
    body: Callable[[argparse.Namespace], int],
    args: argparse.Namespace,
    *,
    on_interrupt: Callable[[KeyboardInterrupt], tuple[str, int]] = lambda exc: ("interrupted", 130),
) -> int:
    """Run a CLI body: a `SiglipScratchError` becomes ``error: <message>`` on stderr and exit 2
    (the traceback only with ``--debug``); Ctrl-C (or a signal turned into KeyboardInterrupt)
    becomes the message and exit code ``on_interrupt`` gives; any other exception is an internal
    error, one line and exit 3."""
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
    except Exception as exc:  # anything else is our bug, never "the check failed"
        if getattr(args, "debug", False):
            raise
        first = f"{type(exc).__name__}: {exc}".splitlines()[0]
        print(f"internal error: {first} (rerun with --debug for the traceback, and report it)", file=sys.stderr)
        return EXIT_INTERNAL
