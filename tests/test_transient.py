"""Transient is not permanent (issue 16, part 5).

A failure that says nothing about the image (network and S3 5xx/throttling past the client's
retries, expired or revoked credentials, ``MemoryError``) is read again inside the decode task
and, if it outlasts ``transient_retry_s``, fails the run with one line, to be resumed; only
facts about the image become error rows. ``--max-error-fraction`` stops a run of mostly errors;
``--resume --retry-errors`` scores again rows committed with a retryable error kind.

The S3 faults come from ``FaultProxy`` (tests/test_faults.py) in front of the moto endpoint;
the client's own retry budget is made short (``config_kwargs.retries.max_attempts=1``: s3fs's
own five tries, about 2 s) so that a fault window of a few seconds outlasts it.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import memscore
from memscore import resume
from memscore.cli import main as cli_main
from memscore.decode import DecodeImages
from memscore.fetch import (RowFetcher, TransientError, TransientFailure, local_read_error,
                            remote_read_error)
from memscore.row_errors import ImageDecodeError
from memscore.error_fraction import ErrorFractionExceeded, ErrorTally
from memscore.run import run_stopped
from test_faults import FaultProxy, is_object_request

SHORT_CLIENT = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


# ------------------------------------------------------------------------- classification
def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _translated(code: str, status: int) -> BaseException:
    from s3fs.errors import translate_boto_error

    return translate_boto_error(_client_error(code, status))


@pytest.mark.parametrize("code,status", [("ExpiredToken", 400), ("InvalidAccessKeyId", 403),
                                         ("AccessDenied", 403), ("SlowDown", 503),
                                         ("InternalError", 500), ("ServiceUnavailable", 503),
                                         ("RequestTimeout", 400), ("SomethingNew", 500)])
def test_remote_failures_that_say_nothing_about_the_image_are_transient(code, status):
    result = remote_read_error(_translated(code, status), "s3://b/k.jpg")
    assert isinstance(result, TransientError), result
    assert result.path == "s3://b/k.jpg" and "\n" not in str(result)


def test_remote_transient_without_an_oserror():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    for exc in (NoCredentialsError(), EndpointConnectionError(endpoint_url="http://x"),
                ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("read timed out"),
                MemoryError()):
        assert isinstance(remote_read_error(exc, "s3://b/k"), TransientError), exc
    assert "NoCredentialsError: Unable to locate credentials" in str(
        remote_read_error(NoCredentialsError(), "s3://b/k"))


@pytest.mark.parametrize("exc,kind", [
    (FileNotFoundError("The specified key does not exist."), "missing file"),
    (IsADirectoryError("b/k"), "not a file"),
    (_translated("NoSuchKey", 404), "missing file"),
    (_translated("NoSuchBucket", 404), "missing file"),
    (_translated("InvalidRange", 416), "empty file"),  # a ranged GET of a 0-byte object
    (_translated("InvalidObjectState", 403), "unreadable"),  # archived, not restored
    (_translated("KeyTooLongError", 400), "unsupported path"),
])
def test_remote_facts_about_the_object_are_row_errors(exc, kind):
    result = remote_read_error(exc, "s3://b/k.jpg")
    assert isinstance(result, ImageDecodeError) and result.kind == kind, result


@pytest.mark.parametrize("exc,kind", [
    (FileNotFoundError(errno.ENOENT, "No such file"), "missing file"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory"), "missing file"),
    (PermissionError(errno.EACCES, "Permission denied"), "unreadable"),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), "not a file"),
    (OSError(errno.ELOOP, "Too many levels of symbolic links"), "unreadable"),
    (OSError(errno.EIO, "Input/output error"), None),
    (OSError(errno.ESTALE, "Stale file handle"), None),
    (OSError(errno.EMFILE, "Too many open files"), None),
    (OSError(errno.ETIMEDOUT, "Connection timed out"), None),
])
def test_local_read_errors(exc, kind):
    result = local_read_error(exc, "/data/a.jpg")
    if kind is None:
        assert isinstance(result, TransientError), result
    else:
        assert isinstance(result, ImageDecodeError) and result.kind == kind, result


# ------------------------------------------------------------------ the stage's own retries
class _Flaky:
    """Patches RowFetcher.read_bytes: each path fails ``failures`` times with ``exc``."""

    def __init__(self, monkeypatch, exc: BaseException, failures: int):
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        original = RowFetcher.read_bytes

        def read(fetcher, path):
            with self.lock:
                self.calls[path] = self.calls.get(path, 0) + 1
                failing = self.calls[path] <= failures
            if failing:
                raise remote_read_error(exc, path)
            return original(fetcher, path)

        monkeypatch.setattr(RowFetcher, "read_bytes", read)


def _stage(**kwargs) -> DecodeImages:
    from memscore.models import resolve_weights

    return DecodeImages("path", {"resmem": resolve_weights("resmem", "DEFAULT").transforms},
                        io_threads=2, **kwargs)


def test_transient_rows_are_read_again_until_they_succeed(monkeypatch, example_images):
    flaky = _Flaky(monkeypatch, ConnectionResetError(errno.ECONNRESET, "reset"), failures=2)
    paths = [str(p) for p in example_images[:3]]
    clock = time.monotonic()
    out = _stage(transient_retry_s=30)(pa.table({"path": paths}))
    assert out.column("memscore_error").to_pylist() == [None] * 3
    assert all(w > 0 for w in out.column("memscore_width").to_pylist())
    assert all(flaky.calls[p] == 3 for p in paths), flaky.calls
    assert 0.5 <= time.monotonic() - clock < 10  # backoff: 0.5-1 s, then 1-2 s


def test_persistent_transient_failure_fails_the_batch_with_one_line(monkeypatch, example_images):
    from botocore.exceptions import NoCredentialsError

    _Flaky(monkeypatch, NoCredentialsError(), failures=10**6)
    paths = [str(p) for p in example_images[:3]]
    with pytest.raises(TransientFailure) as info:
        _stage(transient_retry_s=1.5)(pa.table({"path": paths}))
    message = str(info.value)
    assert "\n" not in message and "NoCredentialsError" in message, message
    assert "reading images failed for" in message and "3 of 3 rows" in message, message
    import pickle

    assert str(pickle.loads(pickle.dumps(info.value))) == message


def test_memory_error_is_transient_not_a_row(monkeypatch, example_images):
    import memscore.decode as decode

    original, calls = decode._load_rgb, []

    def load(image, exif_transpose=False):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError()
        return original(image, exif_transpose)

    monkeypatch.setattr(decode, "_load_rgb", load)
    stage = _stage(transient_retry_s=30)
    stage.io_threads = 1
    out = stage(pa.table({"path": [str(example_images[0])]}))
    assert out.column("memscore_error").to_pylist() == [None] and len(calls) == 2


def test_facts_are_rows_at_once_without_waiting(tmp_path, example_images):
    (tmp_path / "text.jpg").write_bytes(b"not an image")
    paths = [str(tmp_path / "missing.jpg"), str(tmp_path / "text.jpg"), str(example_images[0])]
    clock = time.monotonic()
    out = _stage(transient_retry_s=600)(pa.table({"path": paths}))
    kinds = [e and e.split(":")[0] for e in out.column("memscore_error").to_pylist()]
    assert kinds == ["missing file", "not an image", None]
    assert time.monotonic() - clock < 5


# -------------------------------------------------------------------- S3 fault window, stage
def _window(seconds: float, action: str = "503"):
    """Fault every image GET for ``seconds`` from the first one."""
    state: dict[str, float] = {}

    def decide(method: str, path: str):
        if method != "GET" or not is_object_request(method, path) or "/images/" not in path:
            return None
        start = state.setdefault("start", time.monotonic())
        return action if time.monotonic() - start < seconds else None

    return decide


@pytest.fixture(scope="module")
def image_urls(image_bucket):
    return image_bucket[1]


@pytest.mark.parametrize("action", ["503", "drop"])
def test_s3_faults_longer_than_the_client_budget_end_scored(s3_endpoint, image_urls, action):
    window = 5.0
    with FaultProxy(s3_endpoint.url, _window(window, action)) as proxy:
        clock = time.perf_counter()
        stage = _stage(storage_options={"endpoint_url": proxy.url, **SHORT_CLIENT},
                       transient_retry_s=60)
        out = stage(pa.table({"path": image_urls}))
        wall = time.perf_counter() - clock
    faults = proxy.injected()
    print(f"\n{action} window {window:g} s: {faults} over {len(proxy.log)} requests, {wall:.1f} s")
    assert out.column("memscore_error").to_pylist() == [None] * len(image_urls)
    assert wall > window and faults.get(action, 0) >= len(image_urls) * 2, faults


# ------------------------------------------------------------------------ error fraction
def test_error_tally_stops_once_enough_rows_are_in():
    tally = ErrorTally(0.5, min_rows=100)
    assert tally.add(64, {"missing file": 64}, {"missing file": "missing file: /a/x.jpg"}) is None
    message = tally.add(64, {"missing file": 60, "not an image": 2},
                        {"missing file": "missing file: /a/y.jpg", "not an image": "n"})
    assert message is not None and "\n" not in message
    assert message.startswith("126 of the first 128 rows decoded are errors (98%")
    assert "missing file 124, not an image 2; e.g. missing file: /a/x.jpg" in message
    assert tally.add(1, {}, {}) == message  # every later task is told too
    ok = ErrorTally(0.5, min_rows=100)
    assert ok.add(200, {"not an image": 30}, {"not an image": "x"}) is None
    small = ErrorTally(0.5, min_rows=5)
    assert small.add(4, {"missing file": 4}, {}) is None
    assert small.add(1, {"missing file": 1}, {}) is not None  # judged from min_rows on
    off = ErrorTally(1.0, min_rows=1)
    assert off.add(10, {"missing file": 10}, {}) is None


def test_run_stopped_finds_the_cause_in_ray_chains():
    from ray.exceptions import RayTaskError

    failure = TransientFailure("reading images failed for 600 s after retries: s3://b/k: "
                               "PermissionError: The AWS Access Key Id does not exist")
    wrapped = RayTaskError("decode_batch", "Traceback ...\nlong", failure).as_instanceof_cause()
    try:
        try:
            raise wrapped
        except Exception as exc:
            raise RuntimeError("write failed") from exc
    except RuntimeError as outer:
        line = run_stopped(outer)
    assert line.startswith("reading images failed for 600 s after retries: s3://b/k: Permission")
    assert line.endswith("run the same command with --resume (committed rows are kept)")
    assert "\n" not in line
    assert run_stopped(RuntimeError("y")) is None
    # what Ray Data raises on the driver: the original object is gone, its traceback text stays
    from ray.exceptions import UserCodeException

    text = ("Traceback (most recent call last):\n  File \"x\", line 1, in f\nmemscore.fetch."
            "TransientFailure: reading images failed for 2 s after retries: s3://b/k: "
            "PermissionError: denied\n\nThe above exception was the direct cause of ...")
    remote = RayTaskError("decode_batch", text, UserCodeException("UDF failed"))
    line = run_stopped(remote.as_instanceof_cause())
    assert line.startswith("reading images failed for 2 s after retries: s3://b/k: Permission")
    assert "--max-error-fraction" in run_stopped(ErrorFractionExceeded("900 of ... errors"))


# ------------------------------------------------------------------------- --retry-errors
def _fake_output(folder: Path, *, checkpoint: bool = True) -> None:
    """Two output files as Ray writes them, with their checkpoint id files."""
    work = folder / "_memscore" / "checkpoint"
    work.mkdir(parents=True)
    files = {
        "memscore-part_aa_000000_000000": ([0, 1, 2], [None, "unreadable: x", "missing file: y"]),
        "memscore-part_aa_000001_000000": ([3, 4], [None, None]),
        "memscore-part_aa_000002_000000": ([5], ["decode failed: MemoryError"]),
    }
    for stem, (ids, errors) in files.items():
        table = pa.table({"path": [f"p{i}" for i in ids], "memscore_row": pa.array(ids, pa.int64()),
                          "memorability": [None if e else 0.5 for e in errors],
                          "memscore_error": pa.array(errors, pa.string())})
        pq.write_table(table, folder / f"{stem}.parquet")
        if checkpoint:
            pq.write_table(table.select(["memscore_row"]), work / f"{stem}.parquet")


def _ids(folder: Path) -> list[int]:
    return sorted(pq.read_table(folder, columns=["memscore_row"]).column(0).to_pylist())


def test_drop_error_rows_rewrites_data_and_checkpoint(tmp_path):
    _fake_output(tmp_path)
    dropped = resume.drop_error_rows(str(tmp_path), {}, ("unreadable", "decode failed"))
    assert dropped == 2
    assert _ids(tmp_path) == [0, 1, 2, 3, 4, 5]  # nothing replaced before the plan is applied
    assert resume.apply_retry_plan(str(tmp_path), {})
    assert not resume.apply_retry_plan(str(tmp_path), {})  # idempotent: nothing left
    assert _ids(tmp_path) == [0, 2, 3, 4]
    assert _ids(tmp_path / "_memscore" / "checkpoint") == [0, 2, 3, 4]
    assert not (tmp_path / "memscore-part_aa_000002_000000.parquet").exists()
    assert sorted(p.name for p in (tmp_path / "_memscore").iterdir()) == ["checkpoint"]
    kept = pq.read_table(tmp_path / "memscore-part_aa_000000_000000.parquet")
    assert kept.column("memscore_error").to_pylist() == [None, "missing file: y"]


def test_drop_error_rows_rebuilds_a_finished_runs_checkpoint(tmp_path):
    _fake_output(tmp_path, checkpoint=False)
    assert resume.drop_error_rows(str(tmp_path), {}, ("unreadable",), rebuild_checkpoint=True) == 1
    resume.apply_retry_plan(str(tmp_path), {})
    assert _ids(tmp_path) == [0, 2, 3, 4, 5]
    assert _ids(tmp_path / "_memscore" / "checkpoint") == [0, 2, 3, 4, 5]


def test_a_plan_cut_short_is_replayed_and_one_never_written_is_dropped(tmp_path):
    _fake_output(tmp_path)
    resume.drop_error_rows(str(tmp_path), {}, ("unreadable", "decode failed"))
    plan = tmp_path / "_memscore" / "retry-errors" / "plan.json"
    steps = json.loads(plan.read_text())
    first = steps[0]  # a kill after the first replacement
    Path(first["move"]).replace(first["to"])
    assert resume.apply_retry_plan(str(tmp_path), {})
    assert _ids(tmp_path) == _ids(tmp_path / "_memscore" / "checkpoint") == [0, 2, 3, 4]

    other = tmp_path / "again"
    _fake_output(other)
    resume.drop_error_rows(str(other), {}, ("unreadable",))
    (other / "_memscore" / "retry-errors" / "plan.json").unlink()  # killed before the plan
    assert not resume.apply_retry_plan(str(other), {})
    assert _ids(other) == _ids(other / "_memscore" / "checkpoint") == [0, 1, 2, 3, 4, 5]


# ------------------------------------------------------------------------- whole runs (Ray)
def _manifest(tmp_path: Path, paths: list[str]) -> Path:
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": paths, "id": list(range(len(paths)))}), manifest)
    return manifest


def _score_args(manifest, output, proxy_url=None, *extra) -> list[str]:
    args = ["score", str(manifest), "--output", str(output), "--batch-size", "4",
            "--decode-batch-size", "2", "--rows-per-file", "4", "--rows-per-block", "4",
            *extra]
    if proxy_url:
        args += ["--storage-option", f"endpoint_url={proxy_url}",
                 "--storage-option", "config_kwargs.retries.max_attempts=1"]
    return args


def _check_complete(output: Path, paths: list[str]) -> dict:
    table = pq.read_table(output).sort_by("id")
    assert table.column("id").to_pylist() == list(range(len(paths)))  # each row once
    assert table.column("memscore_error").to_pylist() == [None] * len(paths)
    assert table.column("memorability").null_count == 0
    summary = json.loads((output / "_memscore.json").read_text())
    assert summary["status"] == "complete" and summary["rows_scored"] == len(paths)
    return summary


@pytest.mark.slow
def test_run_through_an_s3_outage_longer_than_the_client_budget(s3_endpoint, ray_local,
                                                                image_urls, tmp_path, capsys):
    paths = image_urls * 2
    manifest = _manifest(tmp_path, paths)
    output = tmp_path / "out"
    with FaultProxy(s3_endpoint.url, _window(6.0)) as proxy:
        code = cli_main(_score_args(manifest, output, proxy.url, "--transient-retry-s", "120"))
    err = capsys.readouterr().err
    print(f"\noutage: {proxy.injected()} over {len(proxy.log)} requests")
    assert code == 0, err
    assert proxy.injected().get("503", 0) > len(paths), proxy.injected()
    _check_complete(output, paths)


@pytest.mark.slow
def test_credentials_revoked_mid_run_stop_with_one_line_and_resume(s3_endpoint, ray_local,
                                                                    image_urls, tmp_path, capsys):
    paths = image_urls * 3  # 15 rows, decode tasks of 2
    manifest = _manifest(tmp_path, paths)
    output = tmp_path / "out"
    state = {"gets": 0, "revoked": True}

    def decide(method: str, path: str):
        if method == "GET" and is_object_request(method, path) and "/images/" in path:
            state["gets"] += 1
            if state["revoked"] and state["gets"] > 6:
                return "403:InvalidAccessKeyId"
        return None

    with FaultProxy(s3_endpoint.url, decide) as proxy:
        clock = time.perf_counter()
        code = cli_main(_score_args(manifest, output, proxy.url, "--transient-retry-s", "2"))
        wall = time.perf_counter() - clock
        err = capsys.readouterr().err.strip().splitlines()
        print(f"\nrevoked: exit {code} after {wall:.1f} s: {err[-1:]}")
        assert code == 2, err
        lines = [line for line in err if line.startswith("memscore: error:")]
        assert len(lines) == 1, err
        assert "reading images failed for" in lines[0] and "PermissionError" in lines[0]
        assert "(InvalidAccessKeyId)" in lines[0], lines[0]
        assert "--resume" in lines[0] and "/images/" in lines[0]
        assert not (output / "_memscore.json").exists()
        state["revoked"] = False  # credentials fixed
        code = cli_main(_score_args(manifest, output, proxy.url, "--resume"))
        assert code == 0, capsys.readouterr().err
    summary = _check_complete(output, paths)
    assert summary["resumed"]


@pytest.mark.slow
def test_max_error_fraction_stops_a_run_of_missing_files(ray_local, tmp_path, capsys):
    paths = [f"photos/{i:04d}.jpg" for i in range(1200)]  # relative to the wrong folder
    manifest = _manifest(tmp_path, paths)
    output = tmp_path / "out"
    code = cli_main(_score_args(manifest, output))
    err = capsys.readouterr().err.strip().splitlines()
    print(f"\nerror fraction: exit {code}: {err[-1:]}")
    assert code == 2, err
    lines = [line for line in err if line.startswith("memscore: error:")]
    assert len(lines) == 1, err
    assert "of the first" in lines[0] and "missing file" in lines[0], lines[0]
    assert "--max-error-fraction 0.5" in lines[0] and "photos/" in lines[0], lines[0]
    # the check is off at 1: the same run completes, every row an error
    code = cli_main(_score_args(manifest, tmp_path / "out1", None, "--max-error-fraction", "1"))
    assert code == 0, capsys.readouterr().err


@pytest.mark.slow
def test_retry_errors_scores_again_rows_an_older_memscore_committed(ray_local, example_images,
                                                                     tmp_path, capsys):
    paths = [str(p) for p in example_images] * 2
    manifest = _manifest(tmp_path, paths)
    output = tmp_path / "out"
    assert cli_main(_score_args(manifest, output)) == 0, capsys.readouterr().err
    # as an older memscore left it: two rows committed as "unreadable" after a network error
    first = sorted(output.glob("memscore-part_*.parquet"))[0]
    table = pq.read_table(first)
    errors = ["unreadable: OSError: [Errno 16] Please reduce your request rate." if i < 2 else e
              for i, e in enumerate(table.column("memscore_error").to_pylist())]
    nulled = [None if i < 2 else v for i, v in enumerate(table.column("memorability").to_pylist())]
    table = table.set_column(table.schema.get_field_index("memscore_error"), "memscore_error",
                             pa.array(errors, pa.string()))
    table = table.set_column(table.schema.get_field_index("memorability"), "memorability",
                             pa.array(nulled, table.schema.field("memorability").type))
    pq.write_table(table, first)
    capsys.readouterr()
    assert cli_main(_score_args(manifest, output, None, "--resume")) == 0  # nothing to do
    assert pq.read_table(output).column("memorability").null_count == 2
    with pytest.raises(memscore.MemscoreError, match="--retry-errors .* --resume"):
        memscore.ScoreConfig(str(manifest), output=str(output), retry_errors=True).validated()
    code = cli_main(_score_args(manifest, output, None, "--resume", "--retry-errors"))
    assert code == 0, capsys.readouterr().err
    summary = _check_complete(output, paths)
    assert summary["rows_done_this_run"] == 2 and summary["rows_done_before_resume"] == len(paths) - 2
