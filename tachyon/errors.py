"""The one exception type for user mistakes (bad flags, missing files, mismatched checkpoints)."""


class TachyonError(Exception):
    """A user error: the command-line tools print its message as one line and exit with status 2."""
