"""Faults a long run meets: a model actor dying mid-batch, transient and permanent S3 errors.

* A model actor killed mid-batch (``memscore.faults``, ``MEMSCORE_INJECT_FAULT``) must cost
  nothing: Ray restarts it and retries the batch, and every row comes out exactly once, scored.
  The run is a ``memscore score`` subprocess, so its own fresh Ray workers inherit the variable.
* Transient S3 errors (``503 SlowDown``, a connection dropped without an answer) must be retried
  by the S3 client, on the image reads, the manifest read and the output writes. A small HTTP
  proxy in front of the moto server (``FaultProxy``) injects them.
* A permanent S3 error (``403 AccessDenied``) must stop the run up front with one line, quickly.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import memscore
from memscore import faults, storage
from memscore.sinks.folder import prepare_output
from memscore.sources.manifest import open_manifest
from memscore.stages.decode import DecodeImages, pixels_column

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------- fault hook
def test_maybe_inject_is_inert_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    faults.maybe_inject("predict")  # returns; the process is still here
    marker = tmp_path / "fired"
    monkeypatch.setenv(faults.ENV_VAR, f"decode:exit-once:{marker}")
    faults.maybe_inject("predict")  # another stage: nothing happens
    assert not marker.exists()
    marker.write_text("")
    monkeypatch.setenv(faults.ENV_VAR, f"predict:exit-once:{marker}")
    faults.maybe_inject("predict")  # already fired once: nothing happens
    monkeypatch.setenv(faults.ENV_VAR, "predict:sometimes")
    with pytest.raises(ValueError, match=faults.ENV_VAR):
        faults.maybe_inject("predict")


def test_maybe_inject_exits_once(tmp_path):
    marker = tmp_path / "fired"
    env = {**os.environ, faults.ENV_VAR: f"predict:exit-once:{marker}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = "from memscore.faults import maybe_inject; maybe_inject('predict'); print('alive')"
    first = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert first.returncode == 1 and "alive" not in first.stdout
    assert marker.exists()
    second = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 0 and second.stdout.strip() == "alive"


# ------------------------------------------------------------------------ model actor death
@pytest.mark.slow
def test_model_actor_dies_mid_batch_and_the_run_still_completes(
    example_images, reference_scores, tmp_path
):
    """The model actor exits (as if killed) on its first batch; Ray Data restarts the actor and
    retries the batch (ActorPoolMapOperator's defaults: max_restarts=-1, max_task_retries=-1).
    Every manifest row must come out exactly once, scored as without the fault."""
    paths = ([str(p) for p in example_images] * 3)[:12]  # 12 rows: 6 model batches of 2
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table({"path": paths, "id": pa.array(range(len(paths)), pa.int64())}), manifest
    )
    output = tmp_path / "out"
    marker = tmp_path / "fault-fired"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", **{faults.ENV_VAR: f"predict:exit-once:{marker}"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

    clock = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memscore.cli",
            "score",
            str(manifest),
            "--output",
            str(output),
            "--batch-size",
            "2",
            "--decode-batch-size",
            "4",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    wall = time.perf_counter() - clock

    died = [
        line
        for line in proc.stderr.splitlines()
        if "died" in line.lower() or "exited unexpectedly" in line.lower()
    ]
    print(
        f"\nactor death run: exit {proc.returncode} in {wall:.1f} s; marker: "
        f"{marker.read_text().strip() if marker.exists() else None}; Ray said: {died[:3]}"
    )
    assert marker.exists(), "the fault never fired: " + proc.stderr[-3000:]
    assert proc.returncode == 0, f"exit {proc.returncode} after {wall:.0f} s: {proc.stderr[-4000:]}"
    table = pq.read_table(output).sort_by("id")
    assert table.column("id").to_pylist() == list(range(len(paths)))  # none lost, none twice
    assert table.column("path").to_pylist() == paths
    assert table.column("memscore_error").null_count == table.num_rows, table.column(
        "memscore_error"
    ).to_pylist()
    for path, value in zip(paths, table.column("memorability").to_pylist()):
        expected = reference_scores[Path(path).name]
        assert value is not None and abs(value - expected) <= 1e-5, (path, value, expected)
    summary = json.loads((output / "_memscore.json").read_text())
    assert summary["status"] == "complete"
    assert summary["rows_in"] == summary["rows_out"] == summary["rows_scored"] == len(paths)


# ----------------------------------------------------------------------------- fault proxy
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>memscore-proxy"
    b"</RequestId></Error>"
)
ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>memscore-proxy</RequestId></Error>"
)


class FaultProxy:
    """An HTTP proxy in front of the moto server that injects S3 faults.

    ``decide(method, path)`` -> None (forward), ``"503"`` (SlowDown), ``"403"`` (AccessDenied),
    ``"403:<Code>"`` (a 403 with that S3 error code, e.g. ExpiredToken) or ``"drop"`` (close
    the connection without an answer). ``log`` records (method, path, action).
    """

    def __init__(self, upstream: str, decide: Callable[[str, str], str | None]):
        host, port = upstream.split("://", 1)[1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.decide = decide
        self.log: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _error(self, status: int, reason: str, body: bytes) -> None:
                self.send_response(status, reason)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                with proxy.lock:
                    action = proxy.decide(self.command, self.path)
                    proxy.log.append((self.command, self.path, action or "forward"))
                if action == "drop":
                    self.close_connection = True
                    try:
                        self.connection.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if action == "503":
                    return self._error(503, "Slow Down", SLOW_DOWN)
                if action == "403":
                    return self._error(403, "Forbidden", ACCESS_DENIED)
                if action.startswith("403:") if action else False:  # 403 with that S3 code
                    code = action[4:].encode()
                    return self._error(
                        403, "Forbidden", ACCESS_DENIED.replace(b"AccessDenied", code)
                    )
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or "content-length" in {k.lower() for k in headers}:
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    length = response.getheader("Content-Length")
                    data = None
                    if length is None and self.command != "HEAD":
                        data = response.read()  # chunked upstream: buffer, send with a length
                        length = str(len(data))
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    if length is not None:
                        self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    if data is not None:
                        self.wfile.write(data)
                        return
                    while chunk := response.read(64 * 1024):  # stream it back
                        self.wfile.write(chunk)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def injected(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, _, action in self.log:
            if action != "forward":
                counts[action] = counts.get(action, 0) + 1
        return counts


def every_nth(
    n: int, max_faults: int, matches: Callable[[str, str], bool], drop_at: tuple[int, ...] = (1,)
) -> Callable[[str, str], str | None]:
    """Fault every ``n``-th matching request, ``max_faults`` at most; the faults numbered in
    ``drop_at`` (0-based) drop the connection, the others answer 503 SlowDown."""
    state = {"seen": 0, "faults": 0}

    def decide(method: str, path: str) -> str | None:
        if not matches(method, path):
            return None
        state["seen"] += 1
        if state["seen"] % n or state["faults"] >= max_faults:
            return None
        state["faults"] += 1
        return "drop" if state["faults"] - 1 in drop_at else "503"

    return decide


def is_object_request(method: str, path: str) -> bool:
    """A request on an object key (``/bucket/key...``), not on a bucket or its listing."""
    key = path.split("?", 1)[0].lstrip("/").split("/", 1)
    return len(key) == 2 and key[1] != ""


def _decoder(endpoint_url: str) -> DecodeImages:
    from memscore.models import resolve_weights

    return DecodeImages(
        "uri",
        {"resmem": resolve_weights("resmem", "DEFAULT").transforms},
        storage_options={"endpoint_url": endpoint_url},
        io_threads=4,
    )


# ---------------------------------------------------------------------- transient S3 errors
def test_image_reads_survive_transient_s3_errors(s3_endpoint, image_bucket):
    _, urls = image_bucket
    table = pa.table({"uri": urls * 2})
    expected = _decoder(s3_endpoint.url)(table)  # straight to moto: the reference pixels
    assert expected.column("memscore_error").null_count == table.num_rows

    with FaultProxy(s3_endpoint.url, every_nth(3, 10, is_object_request)) as proxy:
        clock = time.perf_counter()
        got = _decoder(proxy.url)(table)
        wall = time.perf_counter() - clock

    injected = proxy.injected()
    print(f"\nimage reads: {injected} injected over {len(proxy.log)} requests, {wall:.2f} s")
    assert injected.get("503", 0) > 0 and injected.get("drop", 0) == 1, proxy.log
    assert got.column("memscore_error").to_pylist() == [None] * table.num_rows
    assert got.column("memscore_width").equals(expected.column("memscore_width"))
    column = pixels_column("resmem")
    assert np.array_equal(
        got.column(column).combine_chunks().to_numpy_ndarray(),
        expected.column(column).combine_chunks().to_numpy_ndarray(),
    )


def test_each_image_is_one_get_and_no_head(s3_endpoint, image_bucket):
    """One S3 request per image: a ranged GET, no HEAD for the size first."""
    _, urls = image_bucket
    with FaultProxy(s3_endpoint.url, lambda method, path: None) as proxy:
        got = _decoder(proxy.url)(pa.table({"uri": urls}))
    assert got.column("memscore_error").null_count == len(urls)
    on_objects = [
        (method, path) for method, path, _ in proxy.log if is_object_request(method, path)
    ]
    assert sorted(m for m, _ in on_objects) == ["GET"] * len(urls), proxy.log


def test_manifest_read_and_output_writes_survive_transient_s3_errors(s3_endpoint, image_bucket):
    bucket, urls = image_bucket
    with s3_endpoint.fs.open(f"{bucket}/manifest.parquet", "wb") as f:
        pq.write_table(pa.table({"uri": urls, "id": list(range(len(urls)))}), f)
    s3_endpoint.fs.invalidate_cache()

    # Every 2nd request of any kind (HEAD, list, GET, PUT, DELETE), 10 faults at most.
    with FaultProxy(s3_endpoint.url, every_nth(2, 10, lambda m, p: True)) as proxy:
        options = {"endpoint_url": proxy.url}
        clock = time.perf_counter()
        manifest = open_manifest(
            f"s3://{bucket}/manifest.parquet", path_column="uri", storage_options=options
        )
        assert sum(t.num_rows for t in manifest.iter_tables()) == len(urls)
        assert "id" in manifest.columns
        output = f"s3://{bucket}/scores-{time.monotonic_ns()}/"
        prepare_output(output, overwrite=False, resume=False, storage_options=options)
        fs, path = storage.url_to_fs(output, options)
        written = pa.table({"id": list(range(100)), "x": [float(i) for i in range(100)]})
        with fs.open(f"{path.rstrip('/')}/part-0.parquet", "wb") as f:
            pq.write_table(written, f)
        fs.pipe_file(f"{path.rstrip('/')}/_memscore.json", b'{"status": "complete"}\n')
        pq.write_table(
            written,
            f"{path.rstrip('/')}/part-1.parquet",
            filesystem=storage.pyarrow_filesystem(output, options),
        )
        wall = time.perf_counter() - clock

    injected = proxy.injected()
    print(f"\nmanifest + output: {injected} injected over {len(proxy.log)} requests, {wall:.2f} s")
    assert sum(injected.values()) >= 5 and injected.get("drop", 0) == 1, proxy.log
    methods = {method for method, _, action in proxy.log if action != "forward"}
    assert "PUT" in methods, proxy.log  # the writes themselves met faults, not just the reads
    moto = s3_endpoint.fs
    moto.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in moto.find(path))
    assert names == ["_memscore.json", "part-0.parquet", "part-1.parquet"]  # no probe left
    for name in ("part-0.parquet", "part-1.parquet"):
        with moto.open(f"{path.rstrip('/')}/{name}", "rb") as f:
            assert pq.read_table(f).equals(written)


# ----------------------------------------------------------------------- permanent S3 error
def test_access_denied_output_fails_fast_with_one_line(s3_endpoint):
    bucket = s3_endpoint.make_bucket("denied")  # exists; the proxy refuses everything in it

    def decide(method: str, path: str) -> str | None:
        return "403" if path.lstrip("/").startswith(bucket) else None

    with FaultProxy(s3_endpoint.url, decide) as proxy:
        clock = time.perf_counter()
        with pytest.raises(memscore.MemscoreError) as info:
            prepare_output(
                f"s3://{bucket}/scores/",
                overwrite=False,
                resume=False,
                storage_options={"endpoint_url": proxy.url},
            )
        wall = time.perf_counter() - clock

    message = str(info.value)
    print(f"\n403: {wall:.2f} s, {len(proxy.log)} requests: {message}")
    assert "\n" not in message and message.startswith(f"--output s3://{bucket}/scores/")
    assert "denied" in message.lower() or "forbidden" in message.lower(), message
    assert wall < 5, f"{wall:.1f} s to give up on a 403 ({len(proxy.log)} requests)"
    assert len(proxy.log) <= 6, proxy.log  # a 403 is not retried
