"""Killing a memscore run the way a crash would, and waiting for the point to kill it at.

The resume tests (scoring, fine-tuning, train-sae) start memscore in a process of its own,
SIGKILL it mid-run, and start it again; these are the parts they share.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def ray_processes() -> list[int]:
    """Pids of Ray's processes on this machine (GCS, raylet, workers, agents)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ray/" in cmdline or cmdline.startswith(b"ray::"):
            pids.append(int(entry.name))
    return pids


def kill_run(driver: subprocess.Popen, ray_before: set[int]) -> None:
    """SIGKILL a `memscore score` driver started with ``start_new_session`` and its process
    group. The local Ray it started (GCS, raylet, workers) lives in process groups of its own
    and outlives it, as after a real kill; end it too so it holds no memory."""
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    for pid in set(ray_processes()) - ray_before:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_after_first_train_checkpoint(
    driver: subprocess.Popen, run_dir: Path, ray_before: set[int], timeout_s: float = 400
) -> None:
    """Wait until Ray Train has recorded the first epoch's checkpoint of the training run in
    ``run_dir`` (started with a fault that stalls rank 0 after it), then ``kill_run``."""
    snapshot = run_dir / "ray_train" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and driver.poll() is None:
        if snapshot.exists() and "checkpoint_" in snapshot.read_text():
            break
        time.sleep(0.5)
    assert driver.poll() is None, driver.stdout.read()[-3000:]
    assert snapshot.exists(), f"no checkpoint within {timeout_s:.0f} s"
    time.sleep(2)  # the snapshot is written after the checkpoint folder is complete
    kill_run(driver, ray_before)
