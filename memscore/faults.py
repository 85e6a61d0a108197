"""Test-only fault injection: make a stage's process die once, to prove the run survives it.

Production never sets ``MEMSCORE_INJECT_FAULT``, and then ``maybe_inject`` is one dict lookup.
The tests set it in the environment of a ``memscore`` subprocess, whose fresh Ray workers inherit
it, so a model actor can be killed mid-run exactly as a crash or an OOM kill would kill it.

Format: ``MEMSCORE_INJECT_FAULT="<stage>:exit-once:<marker_path>"``, e.g.
``predict:exit-once:/tmp/x/fired``. The first process to reach ``maybe_inject("<stage>")``
creates ``marker_path`` (atomically, ``O_CREAT | O_EXCL``, so exactly one process on the machine
fires even when several race) and exits at once with ``os._exit(1)``: no cleanup, no exception,
no reply to Ray, like a killed process. Every later call, in any process, finds the marker and does
nothing. The marker must be on a filesystem every process of the run can see (a local path for a
single-machine Ray). Stages: ``"predict"`` (start of ``ScoreImages.__call__``).
"""

from __future__ import annotations

import os

__all__ = ["ENV_VAR", "maybe_inject"]

ENV_VAR = "MEMSCORE_INJECT_FAULT"


def maybe_inject(stage: str) -> None:
    """Exit this process once if ``MEMSCORE_INJECT_FAULT`` names ``stage``; else do nothing."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    want, sep, rest = spec.partition(":")
    mode, sep2, marker = rest.partition(":")
    if not (sep and sep2 and marker) or mode != "exit-once":
        raise ValueError(f"{ENV_VAR}={spec!r}: expected '<stage>:exit-once:<marker_path>'")
    if want != stage:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return  # already fired (here or in another process)
    os.write(fd, f"{stage} pid={os.getpid()}\n".encode())
    os.close(fd)
    os._exit(1)
