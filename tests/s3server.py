"""A real S3 endpoint for the tests: ``moto_server`` (moto[server]) in a subprocess on loopback.

The ``s3_endpoint`` fixture (session scope) starts the server on a free port, waits until it
answers HTTP, and sets the standard AWS_* variables in ``os.environ`` for the session (restored
at the end), so that anything started afterwards (a Ray started later in the session, a CLI
subprocess) reaches the endpoint through the environment alone. Request it *before* ``ray_local``
in a test's arguments: Ray workers inherit the driver's environment only as it was at
``ray.init()``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TEST_ACCESS_KEY = "memscore-test-key-1b7d42"
TEST_SECRET = "memscore-test-secret-5f3a9c"
TEST_REGION = "us-east-1"

__all__ = ["TEST_ACCESS_KEY", "TEST_SECRET", "TEST_REGION", "S3Endpoint", "s3_endpoint"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url + "/", timeout=1) as response:
                response.read()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout:g} s")


@dataclass
class S3Endpoint:
    """The running endpoint: ``url``, the AWS_* ``env`` it set, and a test filesystem ``fs``."""

    url: str
    env: dict[str, str]
    fs: object = field(repr=False)

    def make_bucket(self, prefix: str = "memscore") -> str:
        """Create a fresh, empty bucket; returns its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(name)
        self.fs.invalidate_cache()
        return name

    @property
    def storage_options(self) -> dict:
        """Storage options naming the endpoint explicitly (credentials still from the env)."""
        return {"endpoint_url": self.url}


@pytest.fixture(scope="session")
def s3_endpoint():
    import s3fs

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(os.devnull, "wb")
    proc = subprocess.Popen(
        _server_command(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    env = {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
        "AWS_DEFAULT_REGION": TEST_REGION,
        "AWS_ENDPOINT_URL": url,
    }
    # Variables that could point botocore somewhere else than the env above.
    cleared = (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_REGION",
    )
    saved = {name: os.environ.get(name) for name in (*env, *cleared)}
    try:
        _wait_until_up(url, proc)
        for name in cleared:
            os.environ.pop(name, None)
        os.environ.update(env)
        # No client_kwargs region: s3fs would send it as a LocationConstraint on bucket
        # creation, which S3 (and moto) refuse for us-east-1; the region comes from the env.
        fs = s3fs.S3FileSystem(
            endpoint_url=url, key=TEST_ACCESS_KEY, secret=TEST_SECRET, skip_instance_cache=True
        )
        yield S3Endpoint(url=url, env=dict(env), fs=fs)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
