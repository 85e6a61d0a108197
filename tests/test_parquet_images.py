"""Images inside Parquet (memscore.sources.parquet_images): img2dataset's Parquet output and
Hugging Face datasets' Parquet, recognised with no option, read in place by file and row.

The fast tests read the source without Ray (recognition, the one-line refusals, the rows and
ids the read tasks give, bad cells through the real decode stage); the slow ones score on a real
local Ray, locally and on the moto S3 endpoint, at parity with the published package, then kill
a run, resume it and verify it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from badimages import write_bomb_png, write_text_as_jpg, write_truncated_jpeg
from processes import kill_run, ray_processes

import memscore
from memscore.errors import MemscoreError
from memscore.scoring.verify import verify
from memscore.sinks import open_sink
from memscore.sources.manifest import open_manifest
from memscore.sources.parquet_images import ParquetImages, plan_reads, read_plan

#: img2dataset's metadata columns (downloader.py), then the image column its
#: ParquetSampleWriter appends.
I2D_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
        ("jpg", pa.binary()),
    ]
)
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_img2dataset(folder: Path, shards: list[list[tuple[str, bytes | None]]]) -> list[dict]:
    """img2dataset's ``--output_format parquet`` output, as its writer makes it: one
    ``NNNNN.parquet`` per shard written with ``pq.ParquetWriter`` in buffered tables of 100 rows
    (``BufferedParquetWriter``), a failed download a row with a null ``jpg``, and a
    ``NNNNN_stats.json`` beside each. -> every row's metadata, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard, samples in enumerate(shards):
        with pq.ParquetWriter(folder / f"{shard:05d}.parquet", I2D_SCHEMA) as writer:
            table = []
            for i, (name, data) in enumerate(samples):
                ok = data is not None
                row = {
                    "url": f"https://example.org/{name}",
                    "caption": f"a photo: {name}",
                    "key": f"{shard:05d}{i:04d}",
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "HTTP Error 404: Not Found",
                    "width": 256 if ok else None,
                    "height": 256 if ok else None,
                    "original_width": 640 if ok else None,
                    "original_height": 480 if ok else None,
                    "exif": None,
                    "sha256": None,
                    "jpg": data,
                }
                rows.append({k: v for k, v in row.items() if k != "jpg"} | {"name": name})
                table.append(row)
                if len(table) == 100:
                    writer.write_table(pa.Table.from_pylist(table, I2D_SCHEMA))
                    table = []
            if table:
                writer.write_table(pa.Table.from_pylist(table, I2D_SCHEMA))
        stats = {"count": len(samples), "successes": sum(d is not None for _, d in samples)}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    return rows


def write_hub(folder: Path, splits: list[list[tuple[str, bytes | None]]]) -> Path:
    """A Hugging Face dataset as the Hub stores it: ``data/train-NNNNN-of-NNNNN.parquet`` with
    an ``Image`` feature (``struct<bytes, path>``) and a ``ClassLabel`` (int64) column, and
    the dataset card at the top."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i, samples in enumerate(splits):
        pq.write_table(
            pa.table(
                {
                    "image": pa.array(
                        [{"bytes": b, "path": name} for name, b in samples], HF_IMAGE
                    ),
                    "label": pa.array([n % 3 for n in range(len(samples))], pa.int64()),
                    "caption": [name for name, _ in samples],
                }
            ),
            data / f"train-{i:05d}-of-{len(splits):05d}.parquet",
            row_group_size=2,
        )
    (folder / "README.md").write_text("---\ndataset_info:\n  features:\n  - name: image\n---\n")
    return folder


def _photos(example_images) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in example_images]


# ------------------------------------------------------------------------- recognised, refused
def test_img2dataset_and_hub_folders_are_recognised_with_no_option(tmp_path, example_images):
    write_img2dataset(tmp_path / "i2d", [_photos(example_images)[:2], _photos(example_images)[2:]])
    source = open_manifest(str(tmp_path / "i2d"), rows_in_driver=False)
    assert type(source) is ParquetImages and source.image_column == "jpg"
    assert [Path(f).name for f in source.files] == ["00000.parquet", "00001.parquet"]
    assert source.image_reading()["bytes_column"] == "__memscore_image"

    write_hub(tmp_path / "hub", [_photos(example_images)[:3], _photos(example_images)[3:]])
    hub = open_manifest(str(tmp_path / "hub"), rows_in_driver=False)
    assert type(hub) is ParquetImages and hub.image_column == "image"
    assert [Path(f).name for f in hub.files] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    # a table with a path column is a path manifest, as before, whatever else it holds
    pq.write_table(
        pa.table({"path": [str(example_images[0])], "thumb": [b"\xff\xd8"]}),
        tmp_path / "paths.parquet",
    )
    assert open_manifest(str(tmp_path / "paths.parquet")).kind == "parquet"


def test_two_image_columns_need_image_column_and_wrong_options_are_one_line(tmp_path):
    pq.write_table(pa.table({"key": ["a"], "jpg": [b"x"], "png": [b"y"]}), tmp_path / "two.parquet")
    with pytest.raises(MemscoreError) as caught:
        open_manifest(str(tmp_path / "two.parquet"), rows_in_driver=False)
    assert str(caught.value) == (
        f"{tmp_path / 'two.parquet'}: 2 columns hold bytes (jpg, png); name the image column "
        f"with --image-column"
    )
    chosen = open_manifest(str(tmp_path / "two.parquet"), rows_in_driver=False, image_column="png")
    assert chosen.image_column == "png"
    for column, words in (("nope", "no --image-column 'nope'"), ("key", "is string, not image")):
        with pytest.raises(MemscoreError, match=words) as caught:
            open_manifest(str(tmp_path / "two.parquet"), rows_in_driver=False, image_column=column)
        assert "\n" not in str(caught.value)
    (tmp_path / "m.csv").write_text("path\na.jpg\n")
    with pytest.raises(MemscoreError, match="--image-column is for Parquet whose images"):
        open_manifest(str(tmp_path / "m.csv"), image_column="jpg")
    # read in the driver (finetune, train-sae, evaluate): without the image column, and the
    # other bytes column is a column like any other
    driver = open_manifest(str(tmp_path / "two.parquet"), image_column="png")
    assert driver.columns_in_driver == ("key", "jpg")
    assert pa.concat_tables(driver.read_all()).to_pylist() == [{"key": "a", "jpg": b"x"}]
    with pytest.raises(MemscoreError, match="the image column 'png' is read by Ray tasks"):
        driver.read_all(columns=("key", "png"))


def test_a_truncated_footer_is_one_line_naming_the_file(tmp_path, example_images):
    write_img2dataset(tmp_path / "i2d", [_photos(example_images)[:2], _photos(example_images)[2:]])
    broken = tmp_path / "i2d" / "00001.parquet"
    broken.write_bytes(broken.read_bytes()[:-20])
    source = open_manifest(str(tmp_path / "i2d"), rows_in_driver=False)  # first file is fine
    with pytest.raises(MemscoreError) as caught:
        source.freeze(str(tmp_path / "snap"), limit=None, rows_per_file=10, id_column=None)
    assert str(caught.value).startswith(f"{broken}: cannot read the Parquet footer")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "snap").exists()  # nothing written


# --------------------------------------------------------------------------------- the reads
def _read(source, limit=None, block_bytes=None):
    footers = source.footers()
    options = {} if block_bytes is None else {"block_bytes": block_bytes}
    plans = plan_reads(footers, list(source.files), source.row_counts(limit), **options)
    tables = [
        table
        for plan in plans
        for table in read_plan(
            plan,
            {},
            image_column=source.image_column,
            keep_image_column=source.keep_image_column,
            schema=footers[0].schema.to_arrow_schema(),
            base_dir=source.base_dir,
        )
    ]
    return plans, tables


def test_rows_are_keyed_by_file_and_row_and_big_row_groups_are_cut(tmp_path, example_images):
    # 150 distinct 100 kB cells (what is read, not decoded, here) in 2 row groups of 100 and
    # 50 rows (img2dataset's buffer): 10 MB a row group
    photos = [(f"{i}.jpg", os.urandom(100_000)) for i in range(150)]
    write_img2dataset(tmp_path / "i2d", [photos, photos[:3]])
    source = open_manifest(str(tmp_path / "i2d"), rows_in_driver=False)
    assert source.row_counts() == [150, 3]
    plans, tables = _read(source, block_bytes=2 * 2**20)
    assert [(p.start, p.rows) for p in plans] == [(0, 100), (100, 50), (0, 3)]
    assert len(tables) > 6 and max(t.nbytes for t in tables) <= 2 * 2**20  # cut to 2 MiB
    rows = pa.concat_tables(tables)
    ids = rows.column("memscore_row").to_pylist()
    assert ids == [r for r in range(150)] + [(1 << 32) | r for r in range(3)]
    assert rows.column("key").to_pylist() == [
        f"0000{s}{i:04d}" for s, n in ((0, 150), (1, 3)) for i in range(n)
    ]
    assert "jpg" not in rows.column_names  # the image travels as the internal column only
    assert rows.column("__memscore_image").to_pylist()[7] == photos[7][1]

    # --limit: the first N rows in (file, row) order
    _, tables = _read(source, limit=152, block_bytes=2 * 2**20)
    assert pa.concat_tables(tables).column("memscore_row").to_pylist()[-3:] == [
        149,
        1 << 32,
        (1 << 32) | 1,
    ]


def test_bad_cells_are_error_rows_through_the_decode_stage(tmp_path, example_images):
    from memscore.models import get_model_weights
    from memscore.stages.decode import DecodeImages

    bad = tmp_path / "bad"
    bad.mkdir()
    samples = [
        ("good.png", example_images[0].read_bytes()),
        ("failed download", None),
        ("empty", b""),
        ("text", write_text_as_jpg(bad).read_bytes()),
        ("truncated", write_truncated_jpeg(bad).read_bytes()),
        ("bomb", write_bomb_png(bad).read_bytes()),
    ]
    write_img2dataset(tmp_path / "i2d", [samples])
    source = open_manifest(str(tmp_path / "i2d"), rows_in_driver=False)
    _, tables = _read(source)
    decode = DecodeImages(
        "jpg",
        {"resmem": get_model_weights("resmem").DEFAULT.transforms},
        **{k: v for k, v in source.image_reading().items() if k != "path_column"},
    )
    out = decode(pa.concat_tables(tables))
    errors = out.column("memscore_error").to_pylist()
    assert [e and e.split(":")[0] for e in errors] == [
        None,
        "no image",
        "empty file",
        "not an image",
        "truncated",
        "decompression bomb",
    ]
    assert errors[1] == "no image: the jpg cell is null"
    assert out.column("status").to_pylist()[1] == "failed_to_download"  # kept as it was
    assert "__memscore_image" not in out.column_names


def test_a_hub_cell_without_bytes_reads_its_path(tmp_path, example_images):
    folder = tmp_path / "hub"
    write_hub(folder, [[("x", example_images[0].read_bytes())]])
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "photo.png").write_bytes(example_images[1].read_bytes())
    pq.write_table(
        pa.table(
            {
                "image": pa.array(
                    [
                        {"bytes": None, "path": "../images/photo.png"},  # relative to the folder
                        {"bytes": None, "path": "gone.png"},
                        None,
                    ],
                    HF_IMAGE,
                ),
                "label": pa.array([0, 1, 2], pa.int64()),
                "caption": ["a", "b", "c"],
            }
        ),
        folder / "data" / "train-00000-of-00001.parquet",
    )
    source = open_manifest(str(folder), rows_in_driver=False)
    _, tables = _read(source)
    rows = pa.concat_tables(tables)
    assert rows.column("__memscore_image").to_pylist()[0] == example_images[1].read_bytes()
    errors = rows.column("memscore_error").to_pylist()
    assert errors[0] is None
    assert errors[1].startswith("no image: the image cell has no bytes and its path: missing file")
    assert errors[2] == "no image: the image cell is null"


# --------------------------------------------------------------------------------- end to end
def read_output(out: Path) -> pa.Table:
    return pads.dataset(open_sink(str(out)).files(), format="parquet").to_table()


def _no_image_bytes_under(folder: Path, images: list[bytes]) -> None:
    """No file memscore wrote holds an image's bytes (not the output, not its work folder)."""
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(image[:4096] in data for image in images), path


@pytest.mark.slow
def test_img2dataset_output_is_scored_in_place_at_parity_and_joins_back_on_key(
    tmp_path, ray_local, example_images, reference_scores
):
    """The URL-list workflow's second half (docs/scoring.md): img2dataset's Parquet output
    scored as it lies, then joined back to the URL list on ``key``."""
    photos = _photos(example_images)
    meta = write_img2dataset(
        tmp_path / "i2d", [photos[:3] + [("gone.jpg", None)], photos[3:] + photos[:1]]
    )
    out = tmp_path / "scores"
    summary = memscore.score(
        memscore.ScoreConfig(
            manifest=str(tmp_path / "i2d"), output=str(out), rows_per_file=2, rows_per_block=2
        )
    )
    assert summary["status"] == "complete" and summary["rows_in"] == summary["rows_out"] == 7
    assert summary["rows_scored"] == 6 and summary["error_kinds"] == {"no image": 1}
    assert [f["rows"] for f in summary["parquet_files"]] == [4, 3]
    table = read_output(out)
    # every other column unchanged (names, order, types, values); the image column left out
    original = pq.read_schema(tmp_path / "i2d" / "00000.parquet")
    assert table.schema.names[: len(original) - 1] == original.names[:-1]
    for name in original.names[:-1]:
        assert table.schema.field(name).type == original.field(name).type
    rows = sorted(table.to_pylist(), key=lambda r: r["memscore_row"])
    for row, want in zip(rows, meta):
        assert {k: row[k] for k in want if k != "name"} == {
            k: v for k, v in want.items() if k != "name"
        }
        if want["status"] == "success":
            assert abs(row["memorability"] - reference_scores[want["name"]]) <= 1e-5
        else:
            assert row["memorability"] is None and row["memscore_error"].startswith("no image")
    _no_image_bytes_under(out, [data for _, data in photos])
    report = verify(str(out), str(tmp_path / "i2d"))
    assert report.ok and report.manifest_rows == report.output_rows == 7

    # joined back to the URL list on key: one score per URL, the failed download's null
    urls = pa.table({"key": [m["key"] for m in meta], "URL": [m["url"] for m in meta]})
    joined = urls.join(table.select(["key", "memorability"]), "key")
    assert joined.num_rows == 7 and joined.column("memorability").null_count == 1


@pytest.mark.slow
def test_hub_dataset_on_s3_is_scored_at_parity_with_limit_and_keep(
    s3_endpoint, ray_local, tmp_path, example_images, reference_scores
):
    from s3server import TEST_ACCESS_KEY, TEST_SECRET

    photos = _photos(example_images)
    write_hub(tmp_path / "hub", [photos[:3], photos[3:]])
    bucket = s3_endpoint.make_bucket("hub")
    s3_endpoint.fs.put(str(tmp_path / "hub") + "/", f"{bucket}/ds/", recursive=True)
    options = {"endpoint_url": s3_endpoint.url, "key": TEST_ACCESS_KEY, "secret": TEST_SECRET}
    summary = memscore.score(
        memscore.ScoreConfig(
            manifest=f"s3://{bucket}/ds",
            output=f"s3://{bucket}/scores",
            storage_options=options,
            rows_per_block=2,
        )
    )
    assert summary["status"] == "complete" and summary["rows_scored"] == 5
    local = tmp_path / "scores"
    s3_endpoint.fs.get(f"{bucket}/scores/", str(local), recursive=True)
    table = read_output(local)
    assert table.column_names[:2] == ["label", "caption"] and "image" not in table.column_names
    assert table.schema.field("label").type == pa.int64()
    for row in table.to_pylist():
        assert abs(row["memorability"] - reference_scores[row["caption"]]) <= 1e-5
    _no_image_bytes_under(local, [data for _, data in photos])
    assert verify(f"s3://{bucket}/scores", f"s3://{bucket}/ds", storage_options=options).ok

    # --limit 4 (the first 4 rows in file, row order) and --keep-image-column
    kept = memscore.score(
        memscore.ScoreConfig(
            manifest=f"s3://{bucket}/ds",
            output=f"s3://{bucket}/kept",
            storage_options=options,
            limit=4,
            keep_image_column=True,
        )
    )
    assert kept["rows_out"] == 4
    s3_endpoint.fs.get(f"{bucket}/kept/", str(tmp_path / "kept"), recursive=True)
    table = read_output(tmp_path / "kept")
    assert table.schema.field("image").type == HF_IMAGE
    assert sorted(r["bytes"] for r in table.column("image").to_pylist()) == sorted(
        d for _, d in photos[:4]
    )
    assert verify(f"s3://{bucket}/kept", f"s3://{bucket}/ds", storage_options=options).ok


@pytest.mark.slow
def test_a_truncated_footer_stops_the_run_and_the_same_command_runs_once_fixed(
    tmp_path, ray_local, example_images
):
    photos = _photos(example_images)
    write_img2dataset(tmp_path / "i2d", [photos[:2], photos[2:]])
    good = (tmp_path / "i2d" / "00001.parquet").read_bytes()
    (tmp_path / "i2d" / "00001.parquet").write_bytes(good[:-30])
    config = memscore.ScoreConfig(manifest=str(tmp_path / "i2d"), output=str(tmp_path / "out"))
    with pytest.raises(MemscoreError, match=r"00001\.parquet: cannot read the Parquet footer"):
        memscore.score(config)
    assert not (tmp_path / "out").exists()  # nothing recorded: the output as it was
    (tmp_path / "i2d" / "00001.parquet").write_bytes(good)
    summary = memscore.score(config)  # once fixed, the same command
    assert summary["status"] == "complete" and summary["rows_out"] == 5
    assert verify(str(tmp_path / "out"), str(tmp_path / "i2d")).ok


@pytest.mark.slow
def test_a_killed_run_resumes_to_every_row_once(tmp_path, example_images, reference_scores):
    photos = _photos(example_images)
    write_img2dataset(tmp_path / "i2d", [photos * 2, photos])
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "memscore.cli",
        "score",
        str(tmp_path / "i2d"),
        "--output",
        str(out),
        *("--rows-per-block", "2", "--rows-per-file", "2"),
        *("--decode-batch-size", "2", "--batch-size", "2"),
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
    report = verify(str(out), str(tmp_path / "i2d"))  # mid-run: rows missing, none twice
    assert not report.ok and report.counts["missing"] > 0 and report.counts["duplicated"] == 0

    resumed = subprocess.run(
        [*command, "--resume"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "_memscore.json").read_text())
    assert summary["status"] == "complete" and summary["rows_out"] == 15
    assert summary["rows_done_before_resume"] >= 2
    assert summary["rows_done_before_resume"] + summary["rows_done_this_run"] == 15
    rows = read_output(out).to_pylist()
    assert sorted(r["memscore_row"] for r in rows) == [
        *range(10),
        *((1 << 32) | i for i in range(5)),
    ]
    for row in rows:
        name = row["url"].rsplit("/", 1)[-1]
        assert abs(row["memorability"] - reference_scores[name]) <= 1e-5
    assert verify(str(out), str(tmp_path / "i2d")).ok
