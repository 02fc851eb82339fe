"""The one exception type for user mistakes, and the CLI wrapper that turns it into one line."""

from __future__ import annotations

import sys
from collections.abc import Callable


class TachyonError(Exception):
    """A user error: the command-line tools print its message as one line and exit with status 2."""


class Interrupted(Exception):
    """A run stopped by a signal: the CLI prints the message (what was saved) and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(command: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Run a CLI's body: 0 on success, 2 with one `error: ...` line for a TachyonError, 130 on Ctrl-C.

    An `Interrupted` body prints its own line and exits with its code (128 + the signal that stopped it).
    """
    try:
        command()
    except TachyonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    return 0
