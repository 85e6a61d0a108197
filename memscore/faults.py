"""Test-only fault injection: make a stage's process die once, to prove the run survives it.

Production never sets ``MEMSCORE_INJECT_FAULT``, and then ``maybe_inject`` is one dict lookup.
The tests set it in the environment of a ``memscore`` subprocess, whose fresh Ray workers inherit
it, so a model actor can be killed mid-run exactly as a crash or an OOM kill would kill it.

Format: ``MEMSCORE_INJECT_FAULT="<stage>:<mode>:<marker_path>"``, e.g.
``predict:exit-once:/tmp/x/fired``. Modes:

- ``exit-once``: the first process to reach ``maybe_inject("<stage>")`` creates ``marker_path``
  (atomically, ``O_CREAT | O_EXCL``, so exactly one process on the machine fires even when
  several race) and exits at once with ``os._exit(1)``: no cleanup, no exception, no reply to
  Ray, like a killed process. Every later call, in any process, finds the marker and does nothing.
- ``stall-after-once``: the first call creates the marker and goes on; every later call blocks
  for an hour. With stage ``decode`` the first block is decoded, scored and committed and the
  rest never comes, so a test can kill the driver mid-run at a moment it knows, whatever the
  machine's speed. (With ``predict`` it may stall the very task that carries the first block:
  Ray bundles blocks that queued while the model actor started.)
- ``stall-once``: the first call creates the marker and blocks for an hour; every later call,
  in any process, goes on. The marker names the stalled process's pid and, inside Ray, its node
  id, so a multi-node test can remove exactly the node that holds a task in flight.

The marker must be on a filesystem every process of the run can see (a local path for a
single-machine Ray). Stages: ``"decode"`` (start of each decode task, ``pipeline.decode_batch``) and
``"predict"`` (start of ``ScoreImages.__call__``).
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["ENV_VAR", "maybe_inject"]

ENV_VAR = "MEMSCORE_INJECT_FAULT"


_MODES = ("exit-once", "stall-after-once", "stall-once")


def maybe_inject(stage: str) -> None:
    """Apply the fault ``MEMSCORE_INJECT_FAULT`` names for ``stage``; else do nothing."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    want, sep, rest = spec.partition(":")
    mode, sep2, marker = rest.partition(":")
    if not (sep and sep2 and marker) or mode not in _MODES:
        raise ValueError(
            f"{ENV_VAR}={spec!r}: expected '<stage>:<mode>:<marker_path>' with "
            f"mode one of {', '.join(_MODES)}"
        )
    if want != stage:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # already fired (here or in another process)
        if mode == "stall-after-once":
            time.sleep(3600)
        return
    os.write(fd, f"{stage} pid={os.getpid()}{_node_text()}\n".encode())
    os.close(fd)
    if mode == "exit-once":
        os._exit(1)
    if mode == "stall-once":
        time.sleep(3600)


def _node_text() -> str:
    """' node=<Ray node id>' inside a Ray worker, else ''."""
    ray = sys.modules.get("ray")  # never import Ray here: a process without it has no node
    if ray is None or not ray.is_initialized():
        return ""
    try:
        return f" node={ray.get_runtime_context().get_node_id()}"
    except Exception:  # not in a Ray worker: the pid alone
        return ""
