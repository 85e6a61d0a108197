"""Why a run stopped, in one line (issue 24, items 4 and 7): ``memscore.runtime.failures``.

A Ray task's failure is named by its innermost exception, without ANSI escapes, with the way
on (a full disk: free space and ``--resume``); SIGTERM stops a command as Ctrl-C does (exit
143, one line, no C++ stack dump from Ray's signal handler); a local Ray whose GCS dies
mid-run (or its raylet) ends the command at once with one line instead of after Ray's 60 s.

The end-to-end tests run ``memscore score`` as a process of its own, on a real full
filesystem (a tmpfs the test mounts: root only), with a real SIGTERM and a real SIGKILL of
the run's GCS, and finish each run with ``--resume``, checked by ``memscore verify``.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memscore.cli import guarded, score_command
from memscore.runtime import failures
from memscore.stages.error_fraction import ErrorFractionExceeded
from memscore.stages.fetch import TransientFailure

RESUME = "run the same command with --resume (committed rows are kept)"

# What Ray Data's retry wrapper appends to a failed task's exception (util.py,
# _annotate_exception_with_retry_context): for a two-argument OSError it lands in `filename`.
RAY_DATA_NOTE = (
    "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\nTo "
    "change retry attempts, backoff, or which errors are retried, configure "
    "`ray.data.DataContext.get_current()` if you believe this to be transient."
)

# A write task's traceback as the worker formats it (Ray 2.60, a full tmpfs; frames trimmed).
WRITE_TRACEBACK = """Traceback (most recent call last):
  File "ray/data/_internal/planner/plan_write_op.py", line 36, in fn
    ctx.kwargs["_datasink_write_return"] = datasink_or_legacy_datasource.write(
  File "ray/data/_internal/datasource/parquet_datasink.py", line 395, in _write_parquet_files
    ds.write_dataset(
  File "pyarrow/error.pxi", line 92, in pyarrow.lib.check_status
OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device
"""

# A UDF's OSError as Ray Data reports it: the task's exception is UserCodeException, raised
# from the OSError, which reaches the driver only as this text.
UDF_TRACEBACK = """Traceback (most recent call last):
  File "/work/memscore/stages/pipeline.py", line 40, in decode_batch
    with open(path, "wb") as f:
OSError: [Errno 28] No space left on device: '/data/out/_memscore/x.parquet'

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "ray/data/_internal/planner/plan_udf_map_op.py", line 500, in _wrapped_udf_map_fn
    raise UserCodeException("UDF failed to process a data block.") from e
ray.exceptions.UserCodeException: UDF failed to process a data block.
Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).
"""


def _as_ray_raises(
    function: str, traceback_text: str, cause: BaseException, proctitle: str
) -> BaseException:
    """The exception the driver catches from ``Dataset.write_parquet`` for a failed task:
    Ray's ``RayTaskError`` made an instance of the cause's class, raised by Ray Data from its
    ``SystemException`` marker (``ray.data.exceptions.omit_traceback_stdout``)."""
    from ray.exceptions import RayTaskError

    class SystemException(Exception):  # ray.data.exceptions' marker, without importing Ray Data
        pass

    SystemException.__module__ = "ray.data.exceptions"
    error = RayTaskError(
        function, traceback_text, cause, proctitle=proctitle, pid=7, ip="192.0.2.2"
    ).as_instanceof_cause()
    try:
        raise error from SystemException()
    except BaseException as caught:
        return caught


# ------------------------------------------------------------------ the innermost exception
def test_a_full_disk_in_ray_datas_write_task_is_one_line_with_the_resume_hint():
    exc = _as_ray_raises(
        "write",
        WRITE_TRACEBACK,
        OSError(
            errno.ENOSPC,
            "Error writing bytes to file. Detail: [errno 28] No space left on device",
            RAY_DATA_NOTE,
        ),
        "ray::Write",
    )
    assert type(exc).__name__ == "RayTaskError(OSError)" and "\x1b[" in str(exc)
    assert failures.run_stopped(exc, output="/data/out") == (
        f"No space left on device while writing the output to /data/out: free space and {RESUME}"
    )
    cause = failures.innermost(exc)
    assert (cause.errno, cause.filename, cause.task) == (errno.ENOSPC, None, "Write")
    assert failures.describe(exc) == (
        "OSError: [Errno 28] Error writing bytes to file. "
        "Detail: [errno 28] No space left on device"
    )


def test_an_oserror_that_ray_kept_only_as_text_is_found_with_its_file():
    from ray.exceptions import UserCodeException

    exc = _as_ray_raises(
        "decode_batch",
        UDF_TRACEBACK,
        UserCodeException("UDF failed to process a data block."),
        "ray::ReadParquet->MapBatches(decode_batch)",
    )
    line = failures.run_stopped(exc, output="/data/out")
    assert line == (
        f"No space left on device while writing /data/out/_memscore/x.parquet: "
        f"free space and {RESUME}"
    )
    assert failures.innermost(exc).task == "ReadParquet->MapBatches(decode_batch)"


@pytest.mark.parametrize(
    "number,expected",
    [
        (errno.EDQUOT, "Disk quota exceeded while writing /q/f: free space or raise the quota"),
        (errno.EROFS, "Read-only file system while writing /q/f: make it writable"),
        (errno.EACCES, "Permission denied: /q/f: fix its permissions"),
    ],
)
def test_a_storage_that_refuses_writes_names_the_file_and_what_to_do(number, expected):
    cause = OSError(number, os.strerror(number), "/q/f")
    exc = _as_ray_raises(
        "decode_batch",
        "Traceback (most recent call last):\nOSError: x\n",
        cause,
        "ray::MapBatches(decode_batch)",
    )
    assert failures.run_stopped(exc) == f"{expected} and {RESUME}"


def test_other_errors_are_no_stop_but_are_named_by_their_innermost_exception():
    exc = _as_ray_raises(
        "write",
        'Traceback (most recent call last):\n  File "x", line 1\nValueError: bad block\n',
        ValueError("bad block"),
        "ray::Write",
    )
    assert failures.run_stopped(exc) is None
    assert failures.describe(exc) == "ValueError: bad block"
    assert failures.run_stopped(OSError(errno.EIO, "Input/output error")) is None


def test_an_exception_raised_while_handling_another_is_the_cause_not_the_other():
    text = (
        'Traceback (most recent call last):\n  File "a", line 1\nStopIteration\n\n'
        "During handling of the above exception, another exception occurred:\n\n"
        'Traceback (most recent call last):\n  File "b", line 2\n'
        "PermissionError: [Errno 13] Permission denied: '/out/p.parquet'\n"
    )
    from ray.exceptions import UserCodeException

    exc = _as_ray_raises("write", text, UserCodeException("x"), "ray::Write")
    cause = failures.innermost(exc)
    assert (cause.kind, cause.errno, cause.filename) == ("PermissionError", 13, "/out/p.parquet")


def test_the_purposeful_stops_keep_their_lines():
    assert TransientFailure in failures.STOPPED and ErrorFractionExceeded in failures.STOPPED
    failure = TransientFailure("reading images failed for 600 s after retries: s3://b/k: x")
    exc = _as_ray_raises("decode_batch", "Traceback ...\n", failure, "ray::MapBatches")
    assert failures.run_stopped(exc) == (
        "reading images failed for 600 s after retries: s3://b/k: x; fix it and " + RESUME
    )


# ------------------------------------------------------------------------ the command line
def _args(**values):
    import argparse

    return argparse.Namespace(debug=False, **values)


def test_sigterm_stops_a_command_as_ctrl_c_does_with_143_and_one_line(capsys):
    before = signal.getsignal(signal.SIGTERM)

    def command(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not stop the command")

    started = time.monotonic()
    assert guarded(command, _args()) == 143
    assert time.monotonic() - started < 4
    assert capsys.readouterr().err == "memscore: terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is before  # put back for whoever comes next


def test_the_resume_hint_names_what_finishes_the_command(capsys, monkeypatch):
    import memscore.scoring.job

    def terminated(config):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(memscore.scoring.job, "score", terminated)
    monkeypatch.setattr("memscore.cli.from_args", lambda args, cls: None)
    assert guarded(score_command, _args()) == 143
    assert capsys.readouterr().err == (
        "memscore: terminated (SIGTERM); run the same command with --resume to finish it\n"
    )


def test_an_unexpected_ray_task_error_is_one_line_without_ansi_escapes(capsys):
    exc = _as_ray_raises(
        "write", WRITE_TRACEBACK, OSError(errno.EIO, "Input/output error"), "ray::Write"
    )

    def command(args):
        raise exc

    assert guarded(command, _args()) == 1
    err = capsys.readouterr().err
    assert err == (
        "memscore: error: OSError: [Errno 5] Input/output error (run again with "
        "--debug for the traceback)\n"
    )


def test_ray_datas_logged_tracebacks_stay_off_the_terminal_unless_debug():
    # Asks the handlers rather than capturing stderr: Ray Data's terminal handler keeps the
    # sys.stderr of the moment ray.data is imported, which under capsys is closed after the test.
    import ray.data  # noqa: F401

    handlers = logging.getLogger("ray.data").handlers
    terminal = [h for h in handlers if type(h).__name__ == "PlainRayHandler"]
    log_file = [h for h in handlers if type(h).__name__ == "SessionFileHandler"]
    assert terminal and log_file

    def record(level: int) -> logging.LogRecord:
        return logging.LogRecord(
            "ray.data._internal.execution.streaming_executor_state",
            level,
            __file__,
            1,
            "An exception was raised",
            (),
            None,
        )

    def shown(handler: logging.Handler, level: int) -> bool:
        return bool(handler.filter(record(level)))

    for debug in (False, True):
        with failures.command_line(resume_hint=None, debug=debug):
            failures.ray_started(local=False)  # no Ray needed: Ray Data's loggers only
            assert all(shown(h, logging.ERROR) is debug for h in terminal)
            assert all(shown(h, logging.INFO) for h in terminal)  # what is not an error stays
            assert all(shown(h, logging.ERROR) for h in log_file)  # the log file keeps it all
    assert all(shown(h, logging.ERROR) for h in terminal)  # the filter goes with the command


# ------------------------------------------------------------------------- real Ray tasks
@pytest.fixture
def tmpfs(tmp_path):
    """``mount(name, size)``: a tmpfs of ``size`` (mount's syntax, e.g. ``96k``) at
    ``tmp_path/name``, unmounted after the test; the test is skipped where mounting is not
    possible (not root, no mount namespace rights)."""
    mounted: list[Path] = []

    def mount(name: str, size: str, *options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        result = subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                ",".join((f"size={size}", *options)),
                "tmpfs",
                str(path),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here (a real full filesystem needs root): "
                f"{result.stderr.strip() or result.returncode}"
            )
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_real_ray_data_failures_on_a_full_and_a_read_only_filesystem(ray_local, tmpfs):
    import ray.data

    full = tmpfs("full", "8k")
    ray.data.DataContext.get_current().max_errored_blocks = 0
    rows = ray.data.from_items([{"x": "a" * 1000, "i": i} for i in range(100)]).repartition(10)
    with pytest.raises(Exception) as caught:
        rows.write_parquet(str(full))
    assert failures.run_stopped(caught.value, output=str(full)) == (
        f"No space left on device while writing the output to {full}: free space and {RESUME}"
    )

    read_only = tmpfs("ro", "64k", "ro")

    def write_beside(batch):
        with open(read_only / "x.bin", "wb") as f:
            f.write(b"x")
        return batch

    with pytest.raises(Exception) as caught:
        ray.data.range(4).map_batches(write_beside).materialize()
    assert failures.run_stopped(caught.value) == (
        f"Read-only file system while writing {read_only / 'x.bin'}: make it writable and {RESUME}"
    )


# ------------------------------------------------------------------------ memscore score
ROWS = 12
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def _manifest(tmp_path: Path, example_images) -> Path:
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table(
            {
                "path": [str(example_images[i % len(example_images)]) for i in range(ROWS)],
                "key": [f"k{i:03d}" for i in range(ROWS)],
            }
        ),
        manifest,
    )
    return manifest


def _score(manifest: Path, out: Path, *extra: str) -> list[str]:
    # 3 rows per output file, so the run writes ROWS / 3 files and commits them one by one
    return [
        sys.executable,
        "-m",
        "memscore.cli",
        "score",
        str(manifest),
        "--output",
        str(out),
        "--rows-per-block",
        "3",
        "--rows-per-file",
        "3",
        "--decode-batch-size",
        "3",
        "--batch-size",
        "3",
        *extra,
    ]


def _memscore_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("memscore")]


def _assert_no_ray_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "\x1b[" not in stderr, stderr[-5000:]


def _resume_and_verify(manifest: Path, out: Path) -> None:
    resumed = subprocess.run(
        _score(manifest, out, "--resume"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check = subprocess.run(
        [sys.executable, "-m", "memscore.cli", "verify", str(out), "--manifest", str(manifest)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr


def _descendants(pid: int) -> set[int]:
    """The processes under ``pid`` (the local Ray a driver started: GCS, raylet, workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _gone_within(pids: set[int], seconds: float) -> set[int]:
    """Waits for ``pids`` to end; kills (and returns) those still there after ``seconds``."""
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _alive(pids)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _stalled_run(tmp_path: Path, manifest: Path, out: Path) -> tuple[subprocess.Popen, set[int]]:
    """A run whose first block is committed and whose next decode task stalls (as in
    test_resume.py), so a signal lands mid-run however fast the machine; -> (driver, the
    processes of its local Ray)."""
    stalled = {**ENV, "MEMSCORE_INJECT_FAULT": f"decode:stall-after-once:{tmp_path / 'fired'}"}
    driver = subprocess.Popen(
        _score(manifest, out),
        env=stalled,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while (
        not list(out.glob("memscore-part_*.parquet"))
        and driver.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert driver.poll() is None, driver.communicate()[1][-3000:]
    assert list(out.glob("memscore-part_*.parquet")), "no output file within 300 s"
    return driver, _descendants(driver.pid)


@pytest.mark.slow
def test_a_full_output_filesystem_is_one_line_then_resume_completes(
    tmp_path, tmpfs, example_images
):
    manifest = _manifest(tmp_path, example_images)
    files = ROWS // 3
    # tmpfs counts whole 4 KiB pages, and every file here is smaller than one: the manifest's
    # snapshot (a part per output file), state.json and the lease fit with pages to spare, then
    # half the output files with their checkpoint files; the run fails mid-write.
    out = tmpfs("out", f"{4 * (files + 4 + files)}k")
    run = subprocess.run(
        _score(manifest, out), env=ENV, capture_output=True, text=True, timeout=600
    )
    lines = _memscore_lines(run.stderr)
    assert run.returncode == 2, run.stderr[-5000:]
    assert lines == [
        f"memscore: error: No space left on device while writing the output to "
        f"{out}: free space and {RESUME}"
    ], run.stderr[-5000:]
    _assert_no_ray_traceback(run.stderr)
    assert list(out.glob("memscore-part_*.parquet")), "nothing was written before the disk filled"

    subprocess.run(["mount", "-o", "remount,size=16m", str(out)], check=True)
    _resume_and_verify(manifest, out)


@pytest.mark.slow
def test_sigterm_mid_run_is_one_line_and_143_then_resume_completes(tmp_path, example_images):
    manifest = _manifest(tmp_path, example_images)
    out = tmp_path / "out"
    driver, ray_processes = _stalled_run(tmp_path, manifest, out)
    os.kill(driver.pid, signal.SIGTERM)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 143, stderr[-5000:]
    assert _memscore_lines(stderr) == [
        "memscore: terminated (SIGTERM); run the same command with --resume to finish it"
    ], stderr[-5000:]
    assert "SIGTERM received" not in stderr  # the absl handler's C++ stack dump
    _assert_no_ray_traceback(stderr)
    # the driver stopped its local Ray on the way out, as after Ctrl-C
    assert not _gone_within(ray_processes, 30)
    _resume_and_verify(manifest, out)


#: How soon after its GCS or raylet dies a run says so. The watchdog looks every 0.5 s, then
#: stops the node's other processes (Ray gives each kind 1 s to exit before SIGKILL): 1.6 to
#: 2.6 s measured on 2 busy cores; 20 s leaves room for a loaded machine and stays far below
#: what Ray's driver takes alone (60 s for the GCS, 13 s for the raylet, with no memscore line).
LOSS_BOUND_S = 20


@pytest.mark.slow
@pytest.mark.parametrize(
    "process,name,log",
    [("gcs_server", "GCS", "gcs_server.out"), ("raylet/raylet", "raylet", "raylet.out")],
)
def test_the_local_ray_lost_mid_run_is_one_line_soon_and_its_processes_stopped(
    tmp_path, example_images, process, name, log
):
    """What the run leaves is what a killed run leaves (committed files, their ids, the state
    and a gone holder's lease): its --resume is test_resume.py's and test_bookkeeping.py's, so
    it is not run here again (each resume costs about 35 s on 2 cores)."""
    manifest = _manifest(tmp_path, example_images)
    out = tmp_path / "out"
    driver, ray_processes = _stalled_run(tmp_path, manifest, out)
    victim = [
        pid
        for pid in ray_processes
        if process.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    ]
    assert len(victim) == 1, ray_processes
    os.kill(victim[0], signal.SIGKILL)
    killed = time.monotonic()
    try:
        _, stderr = driver.communicate(timeout=LOSS_BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        _gone_within(ray_processes, 0)
        raise AssertionError(f"the run went on {LOSS_BOUND_S} s after its {name} died") from None
    print(f"{name} killed -> driver exited in {time.monotonic() - killed:.1f} s")
    lines = _memscore_lines(stderr)
    assert driver.returncode == 1, stderr[-5000:]
    assert (
        len(lines) == 1
        and lines[0].startswith(
            f"memscore: error: the local Ray stopped during the run (its {name} process exited, "
            f"killed by SIGKILL; log: "
        )
        and lines[0].endswith(f"{log}): run the same command with --resume to finish it")
    ), stderr[-5000:]
    _assert_no_ray_traceback(stderr)
    # the watchdog stopped the rest of the local Ray: raylet or GCS, workers, agents
    assert not _gone_within(ray_processes, 15)
