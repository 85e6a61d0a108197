"""A real Ray head for tests that submit jobs: ``ray start --head`` with the job server and
token authentication on, in a RAY_TMPDIR of its own, so that ending it ends only its processes.

The ``ray_head`` fixture (conftest.py) yields a ``Head``; ``tests/test_multinode.py`` submits
memscore's jobs to it and ``tests/test_readme.py`` the checkout a README walk-through left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "Head",
    "free_port",
    "processes_with_env",
    "kill_all",
    "private_ray_tmpdir",
    "needs_dashboard",
    "start_ray_head",
]


def _dashboard_missing() -> str | None:
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:
        return None
    error = get_dashboard_dependency_error()
    return f"needs ray[default] (the dashboard's packages): {error}" if error else None


needs_dashboard = pytest.mark.skipif(
    _dashboard_missing() is not None, reason=str(_dashboard_missing())
)


# ------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids whose environment has ``name=value`` (not this process)."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ:
            pids.append(int(entry.name))
    return pids


def kill_all(pids: list[int], grace_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
            time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@contextlib.contextmanager
def private_ray_tmpdir():
    """A fresh RAY_TMPDIR for this process and every Ray process it starts; on exit, whatever
    still runs with it (and only that) is ended, and the folder removed."""
    tmp = tempfile.mkdtemp(prefix="msr", dir="/tmp")  # short: Ray's socket paths stay < 108 bytes
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    try:
        yield tmp
    finally:
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        kill_all(processes_with_env("RAY_TMPDIR", tmp))
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Head:
    url: str  # the dashboard and job API
    token: str  # what `ray get-auth-token` prints on the head
    client_env: dict[str, str]  # a submitting machine that has the token (README, On a cluster)


@contextlib.contextmanager
def start_ray_head(tmp_path: Path):
    """``ray start --head`` on 127.0.0.1 with the job server and token authentication on.

    Ray 2.60 turns token authentication on for a head by itself once ``~/.ray/auth_token``
    exists there (a local ``ray.init()`` writes one): here the head gets a home of its own where
    ``ray get-auth-token --generate`` writes it, and RAY_AUTH_MODE is left unset (the tests'
    "disabled" removed), so Ray decides as on a cluster's head. The submitting machine is given
    the token the README's way: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``.
    """
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    }
    head_env["HOME"] = str(tmp_path / "head-home")
    generated = subprocess.run(
        [ray_cli, "get-auth-token", "--generate"],
        env=head_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert (tmp_path / "head-home" / ".ray" / "auth_token").is_file()
    with private_ray_tmpdir() as tmp:
        head_env["RAY_TMPDIR"] = tmp
        port, dashboard = free_port(), free_port()
        started = subprocess.run(
            [
                ray_cli,
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--num-cpus=3",
                "--num-gpus=0",  # 3 on 2 cores, as memscore's local Ray
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                # ports that default to fixed numbers, taken by any other Ray on the machine
                f"--dashboard-agent-listen-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                "--disable-usage-stats",
            ],
            env=head_env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        assert "Token authentication is enabled" in started.stdout + started.stderr
        # The clean-up finds this Ray's processes by their RAY_TMPDIR: prove that it can.
        assert len(processes_with_env("RAY_TMPDIR", tmp)) >= 3  # GCS, raylet, dashboard...
        # On the head: `ray get-auth-token` (README) prints the token, and only the token.
        token = subprocess.run(
            [ray_cli, "get-auth-token"],
            env=head_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        client_home = tmp_path / "client-home"  # no ~/.ray/auth_token of its own
        client_home.mkdir()
        client_env = {
            **os.environ,
            "HOME": str(client_home),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
        }
        yield Head(f"http://127.0.0.1:{dashboard}", token, client_env)
        # `ray stop` would stop every Ray on the machine; private_ray_tmpdir ends only ours.
