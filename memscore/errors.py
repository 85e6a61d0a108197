"""memscore's error type and its one-line formatting: a problem the user can fix, named on one line.

Every module that stops a run for the user's sake raises ``MemscoreError``; the CLI prints it as
one line (``memscore.cli.guarded``) and per-row failures carry ``first_line`` of their exception.
"""

from __future__ import annotations

import re

__all__ = ["MemscoreError", "first_line", "counted", "strip_ansi"]

# Colour and cursor sequences (CSI), as Ray puts in a remote traceback's header.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


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
    """The first line of an exception's message, without terminal escapes: enough to name a
    problem on one line.

    Example:
        >>> first_line(ValueError("bad header\\nat byte 12"))
        'bad header'
    """
    lines = strip_ansi(str(exc)).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (Ray colours the task name in its tracebacks).

    Example:
        >>> strip_ansi("\\x1b[36mray::Write()\\x1b[39m (pid=1)")
        'ray::Write() (pid=1)'
    """
    return _ANSI.sub("", text)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: the counts of memscore's lines.

    Example:
        >>> counted(1, "epoch"), counted(0, "error"), counted(2, "copy", "copies")
        ('1 epoch', '0 errors', '2 copies')
    """
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
