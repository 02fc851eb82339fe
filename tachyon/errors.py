"""The one exception type for user mistakes, and the CLI wrapper that turns it into one line."""

from __future__ import annotations

import sys
from collections.abc import Callable


class TachyonError(Exception):
    """A user error: the command-line tools print its message as one line and exit with status 2."""


def run_cli(command: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Run a CLI's body: 0 on success, 2 with one `error: ...` line for a TachyonError, 130 on Ctrl-C."""
    try:
        command()
    except TachyonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    return 0
