"""One writer per output: the lease (memscore.sinks.lease), tested the way it breaks.

Two real processes race for one output's lease, on a local folder and on a real S3 endpoint
(moto), started within a few microseconds of each other. How many rounds, and why: on this
machine a naive lease (check that the file is absent, then write it) had two overlapping
holders in 18 of 200 rounds (9 %) of this very race, so 100 local rounds catch such a lease
with probability 1 - 0.91^100 > 0.9999; S3 requests take milliseconds, widening a naive
window, and 40 rounds keep the test under half a minute there. The lease's own correctness
does not rest on timing (O_EXCL-style link, conditional PUTs), so no round may fail.

End to end: two `memscore score` processes started at once into one folder (local and S3),
and a `--resume` started while a run is still going.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memscore.errors import MemscoreError
from memscore.sinks import lease as leases
from memscore.sinks.folder import prepare_output
from memscore.sinks.lease import LEASE_FILE, acquire_lease, read_holder

ROWS = 12


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_foreign_lease(folder: Path, *, host: str, pid: int, age_s: float) -> None:
    (folder / LEASE_FILE).write_text(
        json.dumps(
            {
                "run_id": "0ther",
                "host": host,
                "pid": pid,
                "pid_started": None,
                "started_at": "2026-01-01T00:00:00+00:00",
            }
        )
    )
    then = time.time() - age_s
    os.utime(folder / LEASE_FILE, (then, then))


# ------------------------------------------------------------------------- the lease, fast
def test_a_live_holder_is_refused_with_its_name_and_age(tmp_path):
    with acquire_lease(str(tmp_path)) as first:
        for take_over in (False, True):
            with pytest.raises(MemscoreError) as refused:
                acquire_lease(str(tmp_path), take_over=take_over)
            line = str(refused.value)
            assert "\n" not in line and "being written by another memscore run" in line
            assert f"run {first.run_id}" in line and socket.gethostname() in line
            # the heartbeat was just written: 0 s ago, or 1 s on a loaded machine
            assert f"pid {os.getpid()}" in line
            assert re.search(r"last heartbeat [01] s ago", line), line
    assert not (tmp_path / LEASE_FILE).exists()  # released
    acquire_lease(str(tmp_path)).release()  # and free again


def test_a_gone_holder_is_taken_over_only_when_resuming(tmp_path):
    # this host, a pid that has exited: gone at once, whatever the heartbeat's age
    _write_foreign_lease(tmp_path, host=socket.gethostname(), pid=_dead_pid(), age_s=1)
    with pytest.raises(MemscoreError, match="a memscore run that is gone .* give --resume"):
        acquire_lease(str(tmp_path))
    with acquire_lease(str(tmp_path), take_over=True) as lease:
        assert lease.took_over is not None and lease.took_over.run_id == "0ther"
        assert read_holder(str(tmp_path)).run_id == lease.run_id


def test_another_hosts_holder_is_gone_only_when_its_heartbeat_is_stale(tmp_path):
    _write_foreign_lease(tmp_path, host="another-host", pid=1, age_s=60)
    with pytest.raises(
        MemscoreError,
        match="being written by another memscore run .* another-host.*1 min ago|60 s ago",
    ):
        acquire_lease(str(tmp_path), take_over=True)
    _write_foreign_lease(tmp_path, host="another-host", pid=1, age_s=leases.STALE_AFTER_S + 60)
    with acquire_lease(str(tmp_path), take_over=True) as lease:
        assert lease.took_over.host == "another-host"


def test_the_heartbeat_refreshes_and_a_lost_lease_is_noticed(tmp_path, monkeypatch):
    monkeypatch.setattr(leases, "HEARTBEAT_S", 0.05)
    lease = acquire_lease(str(tmp_path))
    try:
        path = tmp_path / LEASE_FILE
        then = time.time() - 100
        os.utime(path, (then, then))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 5  # refreshed
        assert lease.lost is None
        # Someone replaced the lease (as a takeover does): the holder notices at its next beat.
        path.unlink()
        path.write_text("{}")
        deadline = time.monotonic() + 5
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.lost == "its lease was taken over by another run"
    finally:
        lease.release()
    assert path.read_text() == "{}"  # never deletes a lease that is not its own


def test_a_holder_that_cannot_refresh_fences_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(leases, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(leases, "FENCE_AFTER_S", 0.3)
    lease = acquire_lease(str(tmp_path))
    try:

        def storage_away():
            raise OSError(5, "Input/output error")

        lease._store.refresh = storage_away
        deadline = time.monotonic() + 5
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.lost and lease.lost.startswith("its lease could not be refreshed for")
    finally:
        lease.release()


def test_the_lease_is_not_an_entry_overwrite_deletes_or_that_makes_a_folder_busy(tmp_path):
    out = tmp_path / "out"
    with acquire_lease(str(out)):
        assert (
            prepare_output(str(out), overwrite=False, resume=False, storage_options={}) == "fresh"
        )
        (out / "memscore-part_x_000000-0.parquet").write_bytes(b"PAR1")
        assert prepare_output(str(out), overwrite=True, resume=False, storage_options={}) == "fresh"
        assert sorted(os.listdir(out)) == [LEASE_FILE]
    assert not out.exists()  # made by the lease, left empty: removed with it


def test_a_lease_cut_short_is_judged_by_its_age_alone(tmp_path):
    (tmp_path / LEASE_FILE).write_bytes(b'{"run_id": "ab')  # not JSON
    with pytest.raises(MemscoreError, match="being written by another"):
        acquire_lease(str(tmp_path), take_over=True)
    then = time.time() - leases.STALE_AFTER_S - 1
    os.utime(tmp_path / LEASE_FILE, (then, then))
    acquire_lease(str(tmp_path), take_over=True).release()


# ------------------------------------------------------------------ races of real processes
def _contend(args):
    """One contender: wait for the common start time, try the lease, hold it a moment.
    -> (took it at, let go at) by the monotonic clock, or None when refused."""
    output, storage_options, take_over, start_at = args
    import memscore.sinks.lease as lease_module  # imported before the start line

    while time.time() < start_at:
        pass
    try:
        lease = lease_module.acquire_lease(output, storage_options, take_over=take_over)
    except MemscoreError:
        return None
    took = time.monotonic()
    time.sleep(0.02)
    let_go = time.monotonic()
    lease.release()
    return took, let_go


def _race(outputs, storage_options=None, take_over=False, prepare=None) -> int:
    """Race two processes for each output's lease; -> rounds in which at least one won."""
    won_rounds = 0
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_contend, [(outputs[0] + "-warmup", storage_options, False, 0)] * 2)
        for output in outputs:
            if prepare:
                prepare(output)
            start = time.time() + 0.05
            held = [
                h
                for h in pool.map(_contend, [(output, storage_options, take_over, start)] * 2)
                if h
            ]
            if len(held) == 2:
                (a0, a1), (b0, b1) = held
                assert not (a0 < b1 and b0 < a1), f"two holders at once on {output}"
            won_rounds += bool(held)
    return won_rounds


@pytest.mark.slow
def test_two_processes_racing_for_a_local_lease_never_both_hold_it(tmp_path):
    outputs = [str(tmp_path / f"out{i}") for i in range(100)]
    assert _race(outputs) == 100


@pytest.mark.slow
def test_two_processes_racing_to_take_over_a_gone_holder_never_both_hold_it(tmp_path):
    dead = _dead_pid()

    def gone_holder(output):
        Path(output).mkdir()
        _write_foreign_lease(Path(output), host=socket.gethostname(), pid=dead, age_s=1)

    outputs = [str(tmp_path / f"out{i}") for i in range(50)]
    assert _race(outputs, take_over=True, prepare=gone_holder) == 50


def test_s3_honours_conditional_puts(s3_endpoint):
    """What the lease relies on, checked against the endpoint the tests use: a PUT with
    If-None-Match: * fails when the object exists, and one with If-Match fails when the ETag
    is not the object's."""
    bucket = s3_endpoint.make_bucket("lease")
    with acquire_lease(f"s3://{bucket}/out") as lease:
        assert not lease.unconditional
        with pytest.raises(MemscoreError, match="being written by another memscore run"):
            acquire_lease(f"s3://{bucket}/out", take_over=True)
        assert read_holder(f"s3://{bucket}/out").run_id == lease.run_id
    assert read_holder(f"s3://{bucket}/out") is None


def test_a_gone_holder_on_s3_is_taken_over_by_one_of_two_racers(s3_endpoint):
    bucket = s3_endpoint.make_bucket("lease")
    dead = _dead_pid()

    def gone_holder(output):
        record = {
            "run_id": "0ther",
            "host": socket.gethostname(),
            "pid": dead,
            "pid_started": None,
            "started_at": "2026-01-01T00:00:00+00:00",
        }
        s3_endpoint.fs.pipe_file(
            output.split("://", 1)[1] + "/" + LEASE_FILE, json.dumps(record).encode()
        )

    outputs = [f"s3://{bucket}/take{i}" for i in range(20)]
    assert _race(outputs, take_over=True, prepare=gone_holder) == 20


def test_two_processes_racing_for_an_s3_lease_never_both_hold_it(s3_endpoint):
    bucket = s3_endpoint.make_bucket("lease")
    outputs = [f"s3://{bucket}/out{i}" for i in range(40)]
    assert _race(outputs) == 40


# --------------------------------------------------------------------------- end to end
def _manifest(tmp_path: Path, example_images, rows: int = ROWS) -> Path:
    paths = [str(example_images[i % len(example_images)]) for i in range(rows)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in paths))
    return manifest


def _command(manifest, out, *extra) -> list[str]:
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


def _two_at_once(manifest, out, env) -> list[subprocess.CompletedProcess]:
    procs = [
        subprocess.Popen(
            _command(manifest, out),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def _check_one_won(results, out, manifest, env) -> None:
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [r.stderr[-2000:] for r in results]
    loser = next(r for r in results if r.returncode == 2)
    lines = [line for line in loser.stderr.splitlines() if line.startswith("memscore:")]
    assert len(lines) == 1 and "is being written by another memscore run" in lines[0], loser.stderr[
        -2000:
    ]
    verified = subprocess.run(
        [sys.executable, "-m", "memscore.cli", "verify", str(out), "--manifest", str(manifest)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"output rows:   {ROWS}" in verified.stdout


@pytest.mark.slow
def test_two_runs_started_at_once_into_one_folder_write_every_row_once(tmp_path, example_images):
    manifest = _manifest(tmp_path, example_images)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    _check_one_won(_two_at_once(manifest, out, env), out, manifest, env)
    summary = json.loads((out / "_memscore.json").read_text())
    assert summary["rows_out"] == ROWS and summary["status"] == "complete"
    assert not (out / LEASE_FILE).exists()


def test_two_runs_started_at_once_into_one_s3_prefix_write_every_row_once(
    s3_endpoint, tmp_path, example_images
):
    manifest = _manifest(tmp_path, example_images)
    bucket = s3_endpoint.make_bucket("race")
    out = f"s3://{bucket}/scores"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    _check_one_won(_two_at_once(manifest, out, env), out, manifest, env)
    s3_endpoint.fs.invalidate_cache()
    assert not s3_endpoint.fs.exists(f"{bucket}/scores/{LEASE_FILE}")


@pytest.mark.slow
def test_a_resume_while_the_run_goes_on_is_refused_and_takes_over_once_it_is_killed(
    tmp_path, example_images
):
    from processes import kill_run, ray_processes

    manifest = _manifest(tmp_path, example_images)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_before = set(ray_processes())
    # the first decode task goes through, every later one stalls: mid-run for as long as needed
    stalled = {**env, "MEMSCORE_INJECT_FAULT": f"decode:stall-after-once:{tmp_path / 'fired'}"}
    driver = subprocess.Popen(
        _command(manifest, out),
        env=stalled,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while (
            driver.poll() is None
            and time.monotonic() < deadline
            and not any(p.name.startswith("memscore-part") for p in out.glob("*.parquet"))
        ):
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before the test could resume beside it"
        refused = subprocess.run(
            _command(manifest, out, "--resume"),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert refused.returncode == 2
        assert (
            refused.stderr.strip()
            .splitlines()[-1]
            .startswith(f"memscore: error: --output {out} is being written by another memscore run")
        )
        assert f"pid {driver.pid}" in refused.stderr
    finally:
        kill_run(driver, ray_before)
    # The holder is gone (its pid no longer exists on this host): --resume takes over at once.
    resumed = subprocess.run(
        _command(manifest, out, "--resume"), env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "took over the lease of a memscore run that is gone" in resumed.stderr
    table = pq.read_table(out, columns=["memscore_row"])
    assert sorted(table.column("memscore_row").to_pylist()) == list(range(ROWS))


@pytest.mark.slow
def test_an_output_two_runs_doubled_is_repaired_by_resume(tmp_path, example_images):
    """An output doubled as an older memscore (or a storage without conditional writes) left
    it: the final count says so and names the way on, and --resume keeps one copy of each
    row. Made here the way it happened: a second writer's files beside the first's."""
    manifest = _manifest(tmp_path, example_images)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    first = subprocess.run(
        _command(manifest, out), env=env, capture_output=True, text=True, timeout=900
    )
    assert first.returncode == 0, first.stderr[-3000:]
    # the second writer's files: the same rows, committed under its own write id
    for path in sorted(out.glob("memscore-part_*.parquet"))[:2]:
        copy = path.name.replace("memscore-part_", "memscore-part_ffffffff")
        (out / copy).write_bytes(path.read_bytes())
    summary = json.loads((out / "_memscore.json").read_text())
    summary["status"] = "rows missing or duplicated"  # what that run's final count said
    (out / "_memscore.json").write_text(json.dumps(summary))

    resumed = subprocess.run(
        _command(manifest, out, "--resume"), env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removed 6 second copies of rows that two runs had written" in resumed.stderr
    rows = pq.read_table(out, columns=["memscore_row"]).column("memscore_row").to_pylist()
    assert sorted(rows) == list(range(ROWS))
    summary = json.loads((out / "_memscore.json").read_text())
    assert summary["status"] == "complete" and summary["rows_done_this_run"] == 0


def test_the_final_count_of_a_doubled_output_names_the_way_on():
    from memscore.scoring.job import incomplete_line

    counts = {
        "rows_out": 14,
        "rows_missing": 0,
        "missing_examples": [],
        "rows_duplicated": 2,
        "duplicated_examples": [3, 4],
        "rows_unexpected": 0,
        "unexpected_examples": [],
    }
    line = incomplete_line("scores/", 12, counts)
    assert line.startswith(
        "scores/: 14 rows written for 12 manifest rows: 2 written more "
        "than once (e.g. [3, 4]); another run wrote into this output"
    )
    assert line.endswith("--resume, which keeps one copy of each row")
    counts.update(rows_out=11, rows_missing=1, missing_examples=[7], rows_duplicated=0)
    assert incomplete_line("scores/", 12, counts).endswith(
        "1 missing (e.g. memscore_row [7]); run again with --resume"
    )


def test_a_doubled_output_keeps_the_first_copy_of_each_row(tmp_path):
    from memscore.sinks import resume

    out = tmp_path / "out"
    (out / "_memscore" / "checkpoint").mkdir(parents=True)
    first = pa.table({"memscore_row": [0, 1, 2], "path": ["a", "b", "c"]})
    second = pa.table({"memscore_row": [1, 2, 3], "path": ["b", "c", "d"]})
    pq.write_table(first, out / "memscore-part_aaa_000000-0.parquet")
    pq.write_table(second, out / "memscore-part_bbb_000000-0.parquet")
    for name, table in (("memscore-part_aaa_000000", first), ("memscore-part_bbb_000000", second)):
        pq.write_table(
            table.select(["memscore_row"]), out / "_memscore" / "checkpoint" / f"{name}.parquet"
        )
    assert resume.drop_duplicate_rows(str(out), {}) == 2
    assert resume.apply_retry_plan(str(out), {})
    assert pq.read_table(out / "memscore-part_bbb_000000-0.parquet").to_pydict() == {
        "memscore_row": [3],
        "path": ["d"],
    }
    ids = pq.read_table(out / "_memscore" / "checkpoint" / "memscore-part_bbb_000000.parquet")
    assert ids.column("memscore_row").to_pylist() == [3]  # the checkpoint says the same
    assert resume.drop_duplicate_rows(str(out), {}) == 0
