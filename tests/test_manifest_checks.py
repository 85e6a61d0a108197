"""Every manifest problem before any work (issue 24, item 6) and the manifest's content
fingerprint (item 8): on real files, the CLI in real processes, resume on a real local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import memscore
from memscore.sources.manifest import manifest_fingerprint, open_manifest
from memscore.sources.snapshot import write_snapshot

SCORED = ("memorability", "memscore_row")  # what `memscore score` passes as reserved columns


def repeated_names_parquet(path: Path) -> Path:
    # pyarrow writes a table with two columns of one name; no reader can use it after
    values = pa.array(["a.jpg", "b.jpg"])
    pq.write_table(
        pa.table([values, pa.array([1, 2]), pa.array([3, 4])], names=["path", "x", "x"]), path
    )
    return path


def written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def put_back(path: Path, edit) -> None:
    """``edit(path)`` in place, then the file's modification time as it was."""
    stat = path.stat()
    edit(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


# ------------------------------------------------------------------ open_manifest, before any work
@pytest.mark.parametrize(
    "name, content",
    [
        ("m.csv", "path,x,x\na.jpg,1,2\n"),
        ("m.tsv", "path\tx\tx\na.jpg\t1\t2\n"),
        ("m.jsonl", '{"path": "a.jpg", "x": 1, "x": 2}\n'),
    ],
)
def test_a_repeated_column_name_is_one_line_naming_the_column_and_the_file(tmp_path, name, content):
    source = tmp_path / name
    source.write_text(content)
    with pytest.raises(memscore.MemscoreError) as caught:
        open_manifest(str(source))
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"{source}: column name 'x' is repeated")


def test_a_parquet_file_written_with_repeated_names_is_refused(tmp_path):
    source = repeated_names_parquet(tmp_path / "m.parquet")
    with pytest.raises(
        memscore.MemscoreError, match=r"m.parquet: column name 'x' is repeated; give each column"
    ):
        open_manifest(str(source))
    folder = tmp_path / "parts"  # a folder of Parquet files: the first file's schema
    folder.mkdir()
    repeated_names_parquet(folder / "a.parquet")
    with pytest.raises(memscore.MemscoreError, match=r"parts/a.parquet: column name 'x'"):
        open_manifest(str(folder))


def test_several_repeated_names_are_all_named(tmp_path):
    source = tmp_path / "m.csv"
    source.write_text("path,x,y,x,y,path\na.jpg,1,2,3,4,b.jpg\n")
    with pytest.raises(
        memscore.MemscoreError, match=r"m.csv: column names 'path', 'x', 'y' are repeated"
    ):
        open_manifest(str(source))


def test_a_path_column_that_is_not_text_is_refused_when_its_images_are_read(tmp_path):
    ints = tmp_path / "ints.csv"
    ints.write_text("path,n\n1,2\n3,4\n")
    with pytest.raises(
        memscore.MemscoreError, match=r"ints.csv: the path column 'path' is of type int64, not text"
    ):
        open_manifest(str(ints), reserved_columns=SCORED)
    parquet = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"path": [1, 2]}), parquet)
    with pytest.raises(memscore.MemscoreError, match="is of type int64, not text"):
        open_manifest(str(parquet), image_paths=True)
    jsonl = tmp_path / "ints.jsonl"
    jsonl.write_text('{"path": 1}\n{"path": 2}\n')
    with pytest.raises(memscore.MemscoreError, match="is of type int64, not text"):
        open_manifest(str(jsonl), image_paths=True)
    binary = tmp_path / "latin1.csv"
    binary.write_bytes(b"path\ncaf\xe9.jpg\n")
    with pytest.raises(memscore.MemscoreError, match="'path' holds bytes that are not UTF-8"):
        open_manifest(str(binary), image_paths=True)
    # A table read for its values (evaluate's truth joined on an integer id) is keyed by any
    # column; a JSON-lines column of mixed types is read as text.
    assert open_manifest(str(ints), path_column="n").columns == ("path", "n")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"path": 1}\n{"path": "a.jpg"}\n')
    assert open_manifest(str(mixed), image_paths=True).columns == ("path",)


# ----------------------------------------------------- the CLI: exit 2, one line, output untouched
@pytest.mark.parametrize(
    "make, says",
    [
        (
            lambda d: written(d / "m.csv", "path,x,x\na.jpg,1,2\n"),
            "m.csv: column name 'x' is repeated",
        ),
        (
            lambda d: repeated_names_parquet(d / "m.parquet"),
            "m.parquet: column name 'x' is repeated",
        ),
        (
            lambda d: written(d / "ints.csv", "path\n1\n2\n"),
            "ints.csv: the path column 'path' is of type int64, not text",
        ),
    ],
    ids=["csv", "parquet", "int-paths"],
)
def test_memscore_score_refuses_before_the_output_is_touched(tmp_path, make, says):
    manifest = make(tmp_path)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    fresh, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for out in (fresh, empty):
        done = subprocess.run(
            [sys.executable, "-m", "memscore.cli", "score", str(manifest), "--output", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], done.stderr
    assert not fresh.exists()
    assert list(empty.iterdir()) == []


# ------------------------------------------------------ the snapshot refuses and leaves nothing
def snapshot_config(source: Path, out: Path, **options) -> dict:
    """``write_snapshot``'s options as ``memscore score`` gives them (its defaults, validated)."""
    config = memscore.ScoreConfig(str(source), output=str(out), **options)
    return {
        "limit": config.limit,
        "rows_per_file": config.rows_per_file,
        "id_column": config.id_column,
        "storage_options": config.storage_options,
    }


def test_repeated_ids_refused_by_the_snapshot_leave_nothing_behind(tmp_path):
    """The check needs the whole manifest, so it ends the snapshot: the parts it wrote go, and
    the folders it made, so that the corrected command starts a fresh run."""
    source = tmp_path / "m.csv"
    source.write_text(
        "path,key,id\n" + "".join(f"{i}.jpg,{'k' if i in (1, 8) else i},{i}\n" for i in range(10))
    )
    out = tmp_path / "out"
    out.mkdir()  # as prepare_output leaves it
    folder = out / "_memscore" / "manifest"
    config = snapshot_config(source, out, rows_per_file=3, id_column="key")
    with pytest.raises(
        memscore.MemscoreError, match=r"--id-column 'key' is not unique: 1 values repeat, e.g. 'k'"
    ):
        write_snapshot(open_manifest(str(source)), str(folder), **config)
    assert list(out.iterdir()) == []
    snapshot = write_snapshot(
        open_manifest(str(source)),
        str(folder),
        **snapshot_config(source, out, rows_per_file=3, id_column="id"),
    )
    assert snapshot.rows == 10 and len(list(folder.iterdir())) == 4


def test_a_refused_snapshot_deletes_only_its_own_parts(tmp_path):
    """A folder that was there (a snapshot cut short by a kill, or anything else) keeps what
    is not a part; an empty value in --id-column is found in the last part."""
    source = tmp_path / "m.parquet"
    pq.write_table(
        pa.table(
            {
                "path": [f"{i}.jpg" for i in range(7)],
                "key": pa.array([0, 1, 2, 3, 4, 5, None], pa.int64()),
            }
        ),
        source,
    )
    folder = tmp_path / "out" / "_memscore" / "manifest"
    folder.mkdir(parents=True)
    (folder / "part-000005.parquet").write_bytes(b"PAR1 half a file")  # a killed attempt's
    (folder / "notes.txt").write_text("not memscore's")
    with pytest.raises(memscore.MemscoreError, match="--id-column 'key' has 1 empty values"):
        write_snapshot(
            open_manifest(str(source)),
            str(folder),
            **snapshot_config(source, tmp_path / "out", rows_per_file=2, id_column="key"),
        )
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_a_problem_past_the_first_block_leaves_nothing_behind(tmp_path, monkeypatch):
    """A repeated JSON key on a later line (open_manifest reads the first block only) and a
    later file whose columns differ: one line each, found mid-snapshot, nothing left."""
    import memscore.sources.tables

    monkeypatch.setattr(memscore.sources.tables, "_CSV_BLOCK_BYTES", 4096)  # many blocks
    lines = [json.dumps({"path": f"img{i}.jpg", "n": i}) for i in range(2000)]
    lines[1500] = '{"path": "x.jpg", "n": 1, "n": 2}'
    source = tmp_path / "m.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    manifest = open_manifest(str(source), reserved_columns=SCORED)
    with pytest.raises(
        memscore.MemscoreError, match=r"m.jsonl: column name 'n' is repeated in a JSON line"
    ):
        write_snapshot(
            manifest,
            str(out / "_memscore" / "manifest"),
            **snapshot_config(source, out, rows_per_file=100),
        )
    assert list(out.iterdir()) == []

    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pa.table({"path": [f"{i}.jpg" for i in range(500)]}), parts / "a.parquet")
    pq.write_table(pa.table({"file": ["b.jpg"]}), parts / "b.parquet")
    with pytest.raises(memscore.MemscoreError, match=r"b.parquet: columns \['file'\] differ"):
        write_snapshot(
            open_manifest(str(parts)),
            str(out / "_memscore" / "manifest"),
            **snapshot_config(parts, out, rows_per_file=100),
        )
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------- the content fingerprint
def test_an_edit_in_place_with_size_and_mtime_put_back_changes_the_fingerprint(tmp_path):
    source = tmp_path / "m.csv"
    source.write_text("path,label\na.jpg,cat\nb.jpg,dog\n")
    manifest = open_manifest(str(source))
    before = manifest_fingerprint(manifest)
    assert manifest_fingerprint(open_manifest(str(source))) == before  # stable
    put_back(source, lambda p: p.write_text("path,label\na.jpg,dog\nb.jpg,cat\n"))
    assert manifest_fingerprint(manifest) != before
    # a folder of Parquet files: one file's bytes
    folder = tmp_path / "parts"
    folder.mkdir()
    for name in ("a", "b"):
        pq.write_table(pa.table({"path": [f"{name}.jpg"], "n": [1]}), folder / f"{name}.parquet")
    parts = open_manifest(str(folder))
    before = manifest_fingerprint(parts)
    put_back(
        folder / "b.parquet", lambda p: pq.write_table(pa.table({"path": ["b.jpg"], "n": [2]}), p)
    )
    assert manifest_fingerprint(parts) != before


def test_shards_and_image_folders_keep_their_cheap_fingerprints(tmp_path, example_images):
    """WebDataset shards are named by size and mtime (hashing terabytes is not affordable),
    so an edit that puts both back is not seen; a folder of images by its paths."""
    import io
    import tarfile

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        data = example_images[0].read_bytes()
        info = tarfile.TarInfo("0001.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    shards = open_manifest(str(shard), webdataset=True)
    assert shards.kind == "webdataset"
    before = manifest_fingerprint(shards)

    def flip_a_byte(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(1024)
            byte = f.read(1)
            f.seek(1024)
            f.write(bytes([byte[0] ^ 1]))

    put_back(shard, flip_a_byte)
    assert manifest_fingerprint(shards) == before
    shard.touch()
    assert manifest_fingerprint(shards) != before

    images = open_manifest(str(example_images[0].parent))
    assert manifest_fingerprint(images) == manifest_fingerprint(
        open_manifest(str(example_images[0].parent))
    )


# ------------------------------------------------------------- end to end, on a real local Ray
def cut_csv(tmp_path: Path, example_images, keys) -> Path:
    source = tmp_path / "m.csv"
    source.write_text(
        "path,key,id\n"
        + "".join(
            f"{example_images[i % len(example_images)]},{key},{i}\n" for i, key in enumerate(keys)
        )
    )
    return source


def test_repeated_ids_then_the_corrected_command_needs_no_resume(
    ray_local, tmp_path, example_images
):
    source = cut_csv(tmp_path, example_images, ["a", "b", "a", "c"])
    out = tmp_path / "out"
    with pytest.raises(memscore.MemscoreError) as caught:
        memscore.score(memscore.ScoreConfig(str(source), output=str(out), id_column="key"))
    assert "\n" not in str(caught.value) and "--id-column 'key' is not unique" in str(caught.value)
    assert not out.exists() or list(out.iterdir()) == []
    by_id = memscore.score(memscore.ScoreConfig(str(source), output=str(out), id_column="id"))
    assert by_id["status"] == "complete" and by_id["rows_out"] == 4 and not by_id["resumed"]
    again = tmp_path / "again"
    with pytest.raises(memscore.MemscoreError, match="is not unique"):
        memscore.score(memscore.ScoreConfig(str(source), output=str(again), id_column="key"))
    plain = memscore.score(memscore.ScoreConfig(str(source), output=str(again)))
    assert plain["status"] == "complete" and plain["rows_out"] == 4


def test_resume_refuses_a_manifest_edited_in_place_with_its_mtime_put_back(
    ray_local, tmp_path, example_images
):
    source = cut_csv(tmp_path, example_images, ["a", "b", "c", "d"])
    out = tmp_path / "out"
    done = memscore.score(memscore.ScoreConfig(str(source), output=str(out)))
    assert done["status"] == "complete"
    # the same manifest, untouched: --resume on the finished run returns its summary
    assert (
        memscore.score(memscore.ScoreConfig(str(source), output=str(out), resume=True))["rows_out"]
        == 4
    )
    put_back(source, lambda p: p.write_text(p.read_text().replace(",b,", ",z,")))
    with pytest.raises(memscore.MemscoreError, match=r"\(the manifest's files changed"):
        memscore.score(memscore.ScoreConfig(str(source), output=str(out), resume=True))


def test_on_s3_a_refused_snapshot_leaves_no_part_and_an_edit_changes_the_etag(s3_endpoint):
    """The output on an object store: the refused snapshot's parts are deleted (there are no
    folders to remove); an S3 table manifest is named by its objects' ETags, so an edit of the
    same size is seen without reading the bytes."""
    bucket = s3_endpoint.make_bucket()
    options = s3_endpoint.storage_options
    source = f"s3://{bucket}/m.csv"
    s3_endpoint.fs.pipe(
        f"{bucket}/m.csv",
        b"path,key\n"
        + b"".join(f"{i}.jpg,{'k' if i in (0, 6) else i}\n".encode() for i in range(7)),
    )
    manifest = open_manifest(source, storage_options=options)
    out = f"s3://{bucket}/out"
    with pytest.raises(memscore.MemscoreError, match="--id-column 'key' is not unique"):
        write_snapshot(
            manifest,
            f"{out}/_memscore/manifest",
            rows_per_file=2,
            id_column="key",
            storage_options=options,
        )
    s3_endpoint.fs.invalidate_cache()
    assert s3_endpoint.fs.find(f"{bucket}/out") == []

    before = manifest_fingerprint(manifest)
    assert manifest_fingerprint(open_manifest(source, storage_options=options)) == before
    s3_endpoint.fs.pipe(
        f"{bucket}/m.csv", s3_endpoint.fs.cat(f"{bucket}/m.csv").replace(b"1.jpg", b"9.jpg")
    )
    assert manifest_fingerprint(open_manifest(source, storage_options=options)) != before


@pytest.mark.parametrize(
    "name, content",
    [
        ("m.csv.gz", "path,label\na.jpg,1\nb.jpg,2\n"),
        ("m.tsv.gz", "path\tlabel\na.jpg\t1\nb.jpg\t2\n"),
        ("m.jsonl.gz", '{"path": "a.jpg", "label": 1}\n{"path": "b.jpg", "label": 2}\n'),
        ("m.ndjson.gz", '{"path": "a.jpg", "label": 1}\n{"path": "b.jpg", "label": 2}\n'),
    ],
)
def test_every_gzipped_table_suffix_reads_as_its_format(tmp_path, name, content):
    # The two suffix tables that drifted apart (.jsonl.gz in one, .tsv.gz in the other) are
    # one now (sources/formats.py): each compressed form reads as its plain form does.
    import gzip

    source = tmp_path / name
    source.write_bytes(gzip.compress(content.encode()))
    manifest = open_manifest(str(source))
    rows = [row for table in manifest.iter_tables() for row in table.to_pylist()]
    assert rows == [{"path": "a.jpg", "label": 1}, {"path": "b.jpg", "label": 2}]
