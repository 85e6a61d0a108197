"""memscore's error type and its one-line formatting: a problem the user can fix, named on one line.

Every module that stops a run for the user's sake raises ``MemscoreError``; the CLI prints it as
one line (``memscore.cli.guarded``) and per-row failures carry ``first_line`` of their exception.
"""

from __future__ import annotations

__all__ = ["MemscoreError", "first_line"]


class MemscoreError(Exception):
    """A problem the user can fix (bad manifest, clashing column, output exists ...).

    The CLI prints it as one line and exits non-zero; no traceback.

    Example:
        >>> import memscore
        >>> try:
        ...     memscore.ScoreConfig("photos/", output="scores/", batch_size=0).validated()
        ... except memscore.MemscoreError as exc:
        ...     print(exc)
        --batch-size must be at least 1
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: enough to name a problem on one line.

    Example:
        >>> first_line(ValueError("bad header\\nat byte 12"))
        'bad header'
    """
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
