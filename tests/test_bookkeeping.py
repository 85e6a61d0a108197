"""Atomic bookkeeping and an honest verify, tested the way they break (issue 24's cases 2, 3, 8).

- A real full filesystem (a small tmpfs) under a summary being written: the old file stays
  whole, no file cut short and no temporary file is left.
- A summary or state cut short, as an older memscore left them when the disk filled: the run
  is finished by ``--resume`` from its committed files, and ``verify`` reads it.
- The wrong manifest handed to ``verify``: another CSV, another folder of images, the same
  file edited in place with its size and mtime put back; ``--ignore-identity`` for a manifest
  moved on purpose.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from memscore import storage
from memscore.scoring.verify import NotTheRunsManifest, verify
from memscore.sinks.folder import SUMMARY_FILE, SummaryUnreadable, read_summary, write_summary

ROWS = 12
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def _manifest(folder: Path, example_images, rows: int = ROWS, name="manifest.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(example_images[i % len(example_images)]) for i in range(rows)]
    manifest = folder / name
    manifest.write_text("path,n\n" + "".join(f"{p},{i}\n" for i, p in enumerate(paths)))
    return manifest


def _score(manifest, out, *extra, env=ENV, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [
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
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _verify(out, manifest, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "memscore.cli",
            "verify",
            str(out),
            "--manifest",
            str(manifest),
            *extra,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("memscore:")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


# ------------------------------------------------------------------ a real full filesystem
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a real filesystem that fills. Mounting needs root (CI runs as root)."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_summary_written_on_a_full_disk_leaves_the_old_one_whole(small_tmpfs):
    out = small_tmpfs / "out"
    out.mkdir()
    write_summary(str(out), {"status": "complete", "rows_out": 5}, {})
    # fill the filesystem to the last block
    with open(small_tmpfs / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with pytest.raises(OSError) as full:
        write_summary(str(out), {"status": "complete", "rows_out": 5, "x": "y" * 200_000}, {})
    assert full.value.errno == errno.ENOSPC
    assert read_summary(str(out), {}) == {"status": "complete", "rows_out": 5}
    assert sorted(os.listdir(out)) == [SUMMARY_FILE]  # no temporary file left behind
    with pytest.raises(OSError):  # and none left on a first write either
        storage.write_atomic(str(out / "state.json"), b"{}" * 300_000)
    assert sorted(os.listdir(out)) == [SUMMARY_FILE]


def test_an_unreadable_summary_is_one_line_that_names_resume(tmp_path):
    (tmp_path / SUMMARY_FILE).write_bytes(b"")
    with pytest.raises(SummaryUnreadable, match="0 bytes: cut short when it was written.*--resume"):
        read_summary(str(tmp_path), {})
    (tmp_path / SUMMARY_FILE).write_text('{"status": "comp')
    with pytest.raises(SummaryUnreadable, match="16 bytes, not a whole JSON object"):
        read_summary(str(tmp_path), {})


# ------------------------------------------------------------------ cut short, then resumed
def _interrupted_run(tmp_path, example_images) -> tuple[Path, Path]:
    """A run killed mid-run (its state and some committed files on disk)."""
    from processes import kill_run, ray_processes

    manifest = _manifest(tmp_path, example_images)
    out = tmp_path / "out"
    ray_before = set(ray_processes())
    stalled = {**ENV, "MEMSCORE_INJECT_FAULT": f"decode:stall-after-once:{tmp_path / 'fired'}"}
    driver = subprocess.Popen(
        [
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
        ],
        env=stalled,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while (
        driver.poll() is None
        and time.monotonic() < deadline
        and not list(out.glob("memscore-part_*.parquet"))
    ):
        time.sleep(0.2)
    assert driver.poll() is None and list(out.glob("memscore-part_*.parquet"))
    kill_run(driver, ray_before)
    assert (out / "_memscore" / "state.json").exists()
    return manifest, out


def _all_rows_once(out: Path) -> None:
    rows = pq.read_table(out, columns=["memscore_row"]).column("memscore_row").to_pylist()
    assert sorted(rows) == list(range(ROWS))


@pytest.mark.slow
def test_a_cut_short_summary_and_state_beside_an_interrupted_run_are_finished_by_resume(
    tmp_path, example_images
):
    """Both bookkeeping files cut short at once, as an older memscore left them when the disk
    filled mid-run: verify reports the run unfinished (no JSONDecodeError), a plain run is
    refused, and --resume rebuilds the state and finishes the run from its committed files."""
    manifest, out = _interrupted_run(tmp_path, example_images)
    (out / SUMMARY_FILE).write_bytes(b"")
    checked = _verify(out, manifest)  # from the state's record of the manifest
    assert checked.returncode == 1 and "did not finish" in checked.stdout, checked.stderr
    state = out / "_memscore" / "state.json"
    state.write_bytes(state.read_bytes()[:40])
    refused = _score(manifest, out, check=False)  # the killed run's lease is still there
    assert refused.returncode == 2
    assert "holds the lease of a memscore run that is gone" in _one_line(refused.stderr)
    assert _one_line(refused.stderr).endswith("give --resume to finish its work")
    resumed = _score(manifest, out, "--resume")
    assert (
        "_memscore.json is unreadable (0 bytes: cut short when it was written); finishing "
        "the run from its committed files" in resumed.stderr
    ), resumed.stderr[-3000:]
    assert (
        "state.json is unreadable (40 bytes: cut short when it was written); rebuilt from "
        "this command" in resumed.stderr
    ), resumed.stderr[-3000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["status"] == "complete" and summary["rows_done_before_resume"] > 0
    _all_rows_once(out)
    assert _verify(out, manifest).returncode == 0


# --------------------------------------------------------------------- verify: whose manifest
@pytest.fixture(scope="module")
def finished(tmp_path_factory, example_images):
    folder = tmp_path_factory.mktemp("finished")
    manifest = _manifest(folder, example_images)
    out = folder / "out"
    _score(manifest, out)
    return manifest, out


@pytest.mark.slow
def test_verify_refuses_a_manifest_that_is_not_the_runs(finished, tmp_path, example_images):
    manifest, out = finished
    assert _verify(out, manifest).returncode == 0
    # an unrelated 40-row CSV (other paths) and a folder of 40 other images
    unrelated = tmp_path / "unrelated.csv"
    unrelated.write_text("path\n" + "".join(f"/data/img{i}.jpg\n" for i in range(40)))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(40):
        shutil.copy(
            example_images[i % len(example_images)],
            photos / f"{i}{example_images[i % len(example_images)].suffix}",
        )
    for wrong in (unrelated, photos):
        refused = _verify(out, wrong)
        assert refused.returncode == 1 and refused.stdout == ""
        assert _one_line(refused.stderr) == (
            f"memscore: verify: {out} was made from {manifest}, not {wrong}; give the run's "
            f"manifest, or --ignore-identity if it moved (rows are then matched by path)"
        )
        with pytest.raises(NotTheRunsManifest):
            verify(str(out), str(wrong))
        # told to ignore the identity, it compares paths, and they are not the run's
        matched = _verify(out, wrong, "--ignore-identity")
        assert matched.returncode == 1 and "FAILED" in matched.stdout
        assert "matched by:    path" in matched.stdout


@pytest.mark.slow
def test_verify_ignore_identity_matches_a_moved_manifest_by_path(finished, tmp_path):
    manifest, out = finished
    moved = tmp_path / "elsewhere" / "renamed.csv"
    moved.parent.mkdir()
    shutil.copy(manifest, moved)
    assert "was made from" in _one_line(_verify(out, moved).stderr)
    matched = _verify(out, moved, "--ignore-identity")
    assert matched.returncode == 0, matched.stdout + matched.stderr
    assert "matched by:    path" in matched.stdout and f"output rows:   {ROWS}" in matched.stdout


@pytest.mark.slow
def test_an_edited_manifest_and_a_finished_runs_cut_short_summary(
    finished, tmp_path, example_images
):
    """The module's last test: it edits the finished run's manifest and summary (one scored
    run serves every case of this module; scoring costs about 30 s on 2 cores)."""
    manifest, out = finished
    # the manifest edited in place, its size and mtime put back: verify refuses it
    stat = manifest.stat()
    text = manifest.read_text()
    edited = text.replace(",1\n", ",7\n", 1)  # same size: one digit for another
    assert len(edited) == len(text) and edited != text
    manifest.write_text(edited)
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    refused = _verify(out, manifest)
    assert refused.returncode == 1
    assert _one_line(refused.stderr) == (
        f"memscore: verify: {manifest} has changed since the run read it (its fingerprint "
        f"differs); give --ignore-identity to match rows by path"
    )
    manifest.write_text(text)  # put back: the run's manifest again
    assert _verify(out, manifest).returncode == 0

    # a finished run's summary cut short is finished again from the committed files, unscored
    summary_text = (out / SUMMARY_FILE).read_bytes()
    (out / SUMMARY_FILE).write_bytes(summary_text[: len(summary_text) // 2])
    resumed = _score(manifest, out, "--resume")
    assert "finishing the run from its committed files" in resumed.stderr
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["status"] == "complete" and summary["rows_done_this_run"] == 0
    _all_rows_once(out)
    assert _verify(out, manifest).returncode == 0
    # a manifest whose rows are no longer the output's is refused, not resumed into
    (out / SUMMARY_FILE).write_bytes(b"")
    other = _manifest(tmp_path / "other", list(reversed(example_images)))
    shutil.copy(other, manifest)
    refused = _score(manifest, out, "--resume", check=False)
    assert refused.returncode == 2
    assert "the output was made from another manifest" in _one_line(refused.stderr)
