"""`memscore score` on WebDataset shards, end to end on a real local Ray: local and on the S3
endpoint, bad shards, resume after a kill, `memscore verify`."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from pickle_payload import TouchesMarker
from processes import kill_run, ray_processes

import memscore
from memscore.config import MemscoreError
from memscore.scoring.verify import verify
from memscore.sinks import open_sink
from memscore.sources.webdataset import sample_id

NOT_UTF8 = b"caf\xe9"  # latin-1, as some scraped captions are


def unpickled_marker(folder: Path) -> Path:
    """The file the .pth members of ``write_shards(folder, ...)`` create if anything unpickles
    them (pickle_payload.TouchesMarker)."""
    return folder.parent / "UNPICKLED"


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, images: list[Path]) -> dict:
    """Three shards; -> what each row must be: {(shard, key): (image name or None, error kind)}.

    000000: five samples, one per example image, with txt, json and a .pth member (a pickle
    that creates ``unpickled_marker(folder)`` when loaded).
    000001: two good samples, one with no image, one key repeated after another (duplicate).
    000002: a good sample, then a member cut short (truncated shard).
    """
    folder.mkdir(parents=True, exist_ok=True)
    payload = pickle.dumps(TouchesMarker(unpickled_marker(folder)))
    expect: dict = {}
    with tarfile.open(folder / "000000.tar", "w") as tar:
        for i, image in enumerate(images):
            key = f"a{i:03d}"
            add(tar, f"{key}.{image.suffix.lstrip('.')}", image.read_bytes())
            add(tar, f"{key}.txt", image.name.encode() if i else NOT_UTF8)
            add(tar, f"{key}.json", json.dumps({"name": image.name}).encode())
            add(tar, f"{key}.pth", payload)
            expect[(0, key)] = (image.name, None)
    with tarfile.open(folder / "000001.tar", "w") as tar:
        add(tar, "b000.jpg", images[0].read_bytes())
        add(tar, "b000.txt", b"first")
        add(tar, "b001.txt", b"a caption and no image")
        add(tar, "b002.png", images[1].read_bytes())
        add(tar, "b000.txt", b"again")  # b000 again, after b001 and b002
        expect[(1, "b000")] = (images[0].name, None)
        expect[(1, "b001")] = (None, "no image")
        expect[(1, "b002")] = (images[1].name, None)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        add(tar, "c000.jpg", images[2].read_bytes())
        add(tar, "c001.jpg", images[3].read_bytes())
    data = buffer.getvalue()
    cut = data.index(images[3].read_bytes()[:64]) + 200  # inside c001's bytes
    (folder / "000002.tar").write_bytes(data[:cut])
    expect[(2, "c000")] = (images[2].name, None)
    expect[(2, "c001")] = (None, "truncated shard")
    return expect


def read_output(out: Path) -> pa.Table:
    return pads.dataset([f for f in open_sink(str(out)).files()], format="parquet").to_table()


def check_rows(
    table: pa.Table, expect: dict, reference_scores: dict[str, float], shard_urls: list[str]
) -> None:
    assert {"jpg", "png", "__memscore_image", "__memscore_image_ext"}.isdisjoint(
        table.column_names
    )  # the scored member is not copied, internal columns never written
    rows = table.to_pylist()
    ids = [r["memscore_row"] for r in rows]
    assert len(ids) == len(set(ids))  # once each
    by_place: dict = {}
    for r in rows:
        by_place.setdefault((shard_urls.index(r["__url__"]), r["__key__"]), []).append(r)
    # the repeated b000 group is a row of its own (with its own members), never merged
    repeated = [r for r in by_place[(1, "b000")] if r["memscore_error"]]
    assert len(repeated) == 1 and len(by_place[(1, "b000")]) == 2
    assert repeated[0]["memscore_error"].startswith("duplicate key:")  # txt again
    assert repeated[0]["txt"] == "again"
    by_place[(1, "b000")].remove(repeated[0])
    for place, (image, kind) in expect.items():
        (row,) = by_place.pop(place)
        if kind is None:
            assert row["memscore_error"] is None, row["memscore_error"]
            assert abs(row["memorability"] - reference_scores[image]) <= 1e-5
        else:
            assert row["memscore_error"].startswith(kind + ":"), row["memscore_error"]
            assert row["memorability"] is None
    assert not by_place
    for row in rows:
        shard, sample = divmod(row["memscore_row"], 1 << 32)
        assert row["memscore_row"] == sample_id(shard, sample)
        assert row["__url__"] == shard_urls[shard]


@pytest.mark.slow
def test_shards_are_scored_one_row_per_sample_with_members_kept(
    tmp_path, ray_local, example_images, reference_scores
):
    expect = write_shards(tmp_path / "shards", example_images)
    out = tmp_path / "out"
    summary = memscore.score(
        memscore.ScoreConfig(
            manifest=str(tmp_path / "shards" / "{000000..000002}.tar"),
            output=str(out),
            rows_per_file=4,
            rows_per_block=3,
            decode_batch_size=3,
            batch_size=3,
        )
    )

    shard_urls = [str(tmp_path / "shards" / f"00000{i}.tar") for i in range(3)]
    table = read_output(out)
    check_rows(table, expect, reference_scores, shard_urls)
    assert summary["status"] == "complete" and summary["rows_in"] == table.num_rows == 11
    assert summary["shards"] == [{"url": u, "samples": n} for u, n in zip(shard_urls, (5, 4, 2))]
    assert summary["rows_scored"] == 8

    # one type per member column in every file: text members are strings, others binary
    for path in open_sink(str(out)).files():
        schema = pq.read_schema(path)
        assert schema.field("txt").type == pa.string()
        if "pth" in schema.names:
            assert schema.field("pth").type == pa.binary()
    rows = {r["__key__"]: r for r in table.to_pylist() if r["__url__"] == shard_urls[0]}
    assert rows["a000"]["txt"] == "caf\ufffd"  # not UTF-8: replaced, the column stays text
    assert rows["a001"]["txt"] == example_images[1].name
    assert json.loads(rows["a002"]["json"]) == {"name": example_images[2].name}
    # the .pth member: its bytes, never unpickled by the decode tasks or the writer
    marker = unpickled_marker(tmp_path / "shards")
    assert rows["a003"]["pth"] == pickle.dumps(TouchesMarker(marker))
    assert not marker.exists()

    report = verify(str(out), str(tmp_path / "shards"))  # the folder names the same shards
    assert report.ok and report.manifest_rows == report.output_rows == 11
    # fewer shards are not the run's manifest (checked before any row), and with the identity
    # check off they are still not the shards the run read
    with pytest.raises(MemscoreError, match=r"was made from .*\{000000\.\.000002\}\.tar, not"):
        verify(str(out), str(tmp_path / "shards" / "{000000..000001}.tar"))
    with pytest.raises(MemscoreError, match="the run read 3 shards"):
        verify(str(out), str(tmp_path / "shards" / "{000000..000001}.tar"), ignore_identity=True)

    # a second run of the same command finds the finished run and does nothing
    again = memscore.score(
        memscore.ScoreConfig(
            manifest=str(tmp_path / "shards" / "{000000..000002}.tar"),
            output=str(out),
            rows_per_file=4,
            rows_per_block=3,
            decode_batch_size=3,
            batch_size=3,
            resume=True,
        )
    )
    assert again["finished_at"] == summary["finished_at"]
    # the control: unpickling that member does create the marker
    pickle.loads(rows["a003"]["pth"])
    assert marker.exists()


@pytest.mark.slow
def test_shards_on_s3_to_s3(s3_endpoint, ray_local, tmp_path, example_images, reference_scores):
    from s3server import TEST_ACCESS_KEY, TEST_SECRET

    expect = write_shards(tmp_path / "shards", example_images)
    bucket = s3_endpoint.make_bucket("shards")
    for shard in sorted((tmp_path / "shards").iterdir()):
        s3_endpoint.fs.put_file(str(shard), f"{bucket}/laion/{shard.name}")
    options = {"endpoint_url": s3_endpoint.url, "key": TEST_ACCESS_KEY, "secret": TEST_SECRET}
    summary = memscore.score(
        memscore.ScoreConfig(
            manifest=f"s3://{bucket}/laion/{{000000..000002}}.tar",
            output=f"s3://{bucket}/scores",
            storage_options=options,
            rows_per_file=4,
            rows_per_block=3,
            batch_size=3,
        )
    )
    assert summary["status"] == "complete" and summary["rows_out"] == 11

    local = tmp_path / "scores"
    s3_endpoint.fs.get(f"{bucket}/scores/", str(local), recursive=True)
    urls = [f"s3://{bucket}/laion/00000{i}.tar" for i in range(3)]
    check_rows(read_output(local), expect, reference_scores, urls)
    assert verify(f"s3://{bucket}/scores", f"s3://{bucket}/laion/", storage_options=options).ok
    assert not s3_endpoint.fs.exists(f"{bucket}/scores/_memscore")  # work folder removed


@pytest.mark.slow
def test_a_killed_shard_run_resumes_to_every_sample_once(
    tmp_path, example_images, reference_scores
):
    shards = tmp_path / "shards"
    expect = write_shards(shards, example_images)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "memscore.cli",
        "score",
        str(shards),
        "--output",
        str(out),
        "--rows-per-block",
        "2",
        "--rows-per-file",
        "2",
        "--decode-batch-size",
        "2",
        "--batch-size",
        "2",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # the first decode task goes through, every later one stalls: the kill lands mid-run
    stalled = {**env, "MEMSCORE_INJECT_FAULT": f"decode:stall-after-once:{tmp_path / 'fired'}"}
    ray_before = set(ray_processes())
    driver = subprocess.Popen(
        command,
        env=stalled,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not open_sink(str(out)).files() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None, "the run ended before it could be killed"
    assert open_sink(str(out)).files(), "no output file within 300 s"
    kill_run(driver, ray_before)
    try:  # mid-run: shards not read yet cannot be checked; read ones show rows missing
        report = verify(str(out), str(shards))
    except MemscoreError as exc:
        assert "have not been read to their end" in str(exc)
    else:
        assert not report.ok and report.counts["missing"] > 0

    resumed = subprocess.run(
        [*command, "--resume"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "_memscore.json").read_text())
    assert summary["status"] == "complete" and summary["rows_out"] == 11
    assert summary["rows_done_before_resume"] >= 2
    assert summary["rows_done_before_resume"] + summary["rows_done_this_run"] == 11
    urls = [str(shards / f"00000{i}.tar") for i in range(3)]
    check_rows(read_output(out), expect, reference_scores, urls)
    assert verify(str(out), str(shards)).ok


def test_limit_and_id_column_are_refused_for_shards_with_one_line(tmp_path, example_images):
    write_shards(tmp_path / "shards", example_images)
    for option, words in (
        ({"limit": 3}, "--limit cannot cut WebDataset shards"),
        ({"id_column": "key"}, "--id-column is for table manifests"),
    ):
        with pytest.raises(MemscoreError, match=words) as caught:
            memscore.score(
                memscore.ScoreConfig(
                    manifest=str(tmp_path / "shards"), output=str(tmp_path / "out"), **option
                )
            )
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "out").exists()  # refused before anything was written


def test_an_img2dataset_folder_is_read_as_shards(tmp_path, example_images):
    """img2dataset writes a .parquet and a _stats.json beside each shard: still shards."""
    from memscore.sources.manifest import open_manifest

    write_shards(tmp_path / "out", example_images)
    for i in range(3):
        pq.write_table(pa.table({"key": ["x"]}), tmp_path / "out" / f"00000{i}.parquet")
        (tmp_path / "out" / f"00000{i}_stats.json").write_text("{}")
    manifest = open_manifest(str(tmp_path / "out"), webdataset=True)
    assert manifest.kind == "webdataset" and len(manifest.files) == 3
    with pytest.raises(MemscoreError, match="WebDataset shards can be scored"):
        open_manifest(str(tmp_path / "out"))  # a command that reads rows in the driver


def test_a_storage_failure_reading_a_shard_stops_the_run_as_transient(
    tmp_path, example_images, monkeypatch
):
    """An OSError from the storage while a shard is read (a connection lost past the client's
    retries) is no fact about the shard: the read task fails with TransientFailure, which the
    run reports as one line to --resume, never as rows."""
    from memscore.runtime.failures import run_stopped
    from memscore.sources import webdataset
    from memscore.stages.fetch import TransientFailure

    write_shards(tmp_path / "shards", example_images)
    real = webdataset.iter_shard

    def cut_off(url, *args, **kwargs):
        tables = real(url, *args, **kwargs)
        yield next(tables)
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(webdataset, "iter_shard", cut_off)
    shard = str(tmp_path / "shards" / "000000.tar")
    (task,) = webdataset._datasource_class()(
        [shard], None, {"max_table_bytes": 1}, None
    ).get_read_tasks(1)
    blocks = task.read_fn()
    assert next(iter(blocks)).num_rows == 1
    with pytest.raises(
        TransientFailure,
        match="reading shard .*000000.tar failed after 1 samples: .*Connection reset",
    ) as caught:
        list(blocks)
    assert "fix it and run the same command with --resume" in run_stopped(caught.value)
