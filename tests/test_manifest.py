"""Hostile and odd manifests: each is read faithfully, or stops with one clear line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import memscore
from memscore.sources.manifest import open_manifest
from memscore.sources.snapshot import ROW_COLUMN, write_snapshot


def snapshot_table(source, tmp_path, **config) -> pa.Table:
    config = memscore.ScoreConfig(str(source), output=str(tmp_path / "out"), **config)
    manifest = open_manifest(str(source), path_column=config.path_column)
    snapshot = write_snapshot(
        manifest,
        str(tmp_path / "out"),
        limit=config.limit,
        rows_per_file=config.rows_per_file,
        id_column=config.id_column,
    )
    return pa.concat_tables(pq.read_table(f) for f in snapshot.files)


def test_csv_with_non_utf8_bytes_keeps_them_as_binary(tmp_path):
    source = tmp_path / "m.csv"
    source.write_bytes(b"path,caption\na.jpg,caf\xe9 au lait\nb.jpg,plain\n")
    table = snapshot_table(source, tmp_path)
    assert table.schema.field("caption").type == pa.binary()
    assert table.column("caption").to_pylist() == [b"caf\xe9 au lait", b"plain"]


def test_non_utf8_path_column_is_refused(tmp_path):
    source = tmp_path / "m.csv"
    source.write_bytes(b"path\ncaf\xe9.jpg\n")
    with pytest.raises(memscore.MemscoreError, match="'path' holds bytes that are not UTF-8"):
        snapshot_table(source, tmp_path)


def test_ragged_csv_row_stops_with_the_line(tmp_path):
    source = tmp_path / "m.csv"
    source.write_text("path,a,b\nx.jpg,1,2\ny.jpg,3\n")
    with pytest.raises(
        memscore.MemscoreError,
        match=r"m.csv: cannot read the manifest: CSV parse "
        r"error: Expected 3 columns, got 2",
    ):
        snapshot_table(source, tmp_path)


def test_csv_column_of_mixed_types_is_read_as_text(tmp_path):
    source = tmp_path / "m.csv"
    rows = "".join(f"img{i}.jpg,{i}\n" for i in range(100_000)) + "last.jpg,abc\n"
    source.write_text("path,value\n" + rows)
    table = snapshot_table(source, tmp_path, rows_per_file=50_000)
    assert table.num_rows == 100_001
    assert table.schema.field("value").type == pa.string()
    assert table.column("value")[-1].as_py() == "abc" and table.column("value")[0].as_py() == "0"


def test_jsonl_column_of_mixed_types_becomes_json_text(tmp_path):
    source = tmp_path / "m.jsonl"
    lines = [{"path": f"img{i}.jpg", "value": i} for i in range(30_000)]
    lines.append({"path": "x.jpg", "value": "high", "extra": [1, 2]})
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    table = snapshot_table(source, tmp_path)
    assert table.num_rows == 30_001
    assert table.column("value").to_pylist()[:2] == ["0", "1"]
    assert table.column("value")[-1].as_py() == "high"
    assert table.column("extra").to_pylist()[-1] == [1, 2]
    assert table.column(ROW_COLUMN).to_pylist() == list(range(30_001))


def test_very_long_strings_survive(tmp_path):
    source = tmp_path / "m.parquet"
    long = "é" * 2_000_000
    pq.write_table(pa.table({"path": ["a.jpg"], "note": [long]}), source)
    assert snapshot_table(source, tmp_path).column("note")[0].as_py() == long


def test_one_row_and_zero_rows(tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("path\na.jpg\n")
    assert snapshot_table(one, tmp_path).num_rows == 1
    zero = tmp_path / "zero.csv"
    zero.write_text("path\n")
    with pytest.raises(memscore.MemscoreError, match="no rows"):
        open_manifest(str(zero))


def test_parquet_folder_files_of_different_types_name_the_column(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(
        pa.table({"path": ["a.jpg"], "n": pa.array([1], pa.int64())}), folder / "a.parquet"
    )
    pq.write_table(
        pa.table({"path": ["b.jpg"], "n": pa.array([2], pa.int32())}), folder / "b.parquet"
    )
    pq.write_table(
        pa.table({"path": ["c.jpg"], "n": pa.array(["x"], pa.string())}), folder / "c.parquet"
    )
    with pytest.raises(
        memscore.MemscoreError, match=r"c.parquet: column 'n' is string here but int64"
    ):
        snapshot_table(folder, tmp_path)
    (folder / "c.parquet").unlink()  # int32 casts to the first file's int64 losslessly
    assert snapshot_table(folder, tmp_path).column("n").to_pylist() == [1, 2]


def test_a_later_file_with_other_column_names_stops_with_one_line(tmp_path):
    """Its rows are not read with a null path (what pyarrow.dataset's unification gives)."""
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"path": ["a.jpg"], "n": [1]}), folder / "a.parquet")
    pq.write_table(pa.table({"file": ["b.jpg"], "n": [2]}), folder / "b.parquet")
    with pytest.raises(
        memscore.MemscoreError,
        match=r"b.parquet: columns \['file', 'n'\] differ from the first "
        r"manifest file's \['path', 'n'\]",
    ):
        snapshot_table(folder, tmp_path)


def test_limit_takes_the_first_rows_across_files(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for part in range(3):
        pq.write_table(
            pa.table({"path": [f"{part}-{i}.jpg" for i in range(4)]}),
            folder / f"part{part}.parquet",
        )
    table = snapshot_table(folder, tmp_path, limit=6, rows_per_file=4)
    assert table.column("path").to_pylist() == [f"0-{i}.jpg" for i in range(4)] + [
        "1-0.jpg",
        "1-1.jpg",
    ]


def test_hostile_manifest_end_to_end(ray_local, tmp_path, example_images, reference_scores):
    """Non-UTF-8 metadata, a 1 MB string and a 1-row manifest through the whole job."""
    source = tmp_path / "m.csv"
    note = "x" * 1_000_000
    source.write_bytes(
        b"path,caption,note\n"
        + str(example_images[0]).encode()
        + b",caf\xe9,"
        + note.encode()
        + b"\n"
    )
    summary = memscore.score(memscore.ScoreConfig(str(source), output=str(tmp_path / "out")))
    table = pq.read_table(tmp_path / "out")
    assert summary["rows_out"] == table.num_rows == 1
    assert table.column("caption").to_pylist() == [b"caf\xe9"]
    assert table.column("note")[0].as_py() == note
    assert (
        abs(table.column("memorability")[0].as_py() - reference_scores[example_images[0].name])
        <= 1e-5
    )


def test_a_folder_is_scanned_for_images_whatever_else_it_holds(tmp_path, example_images):
    """A stray table file does not turn a photo folder into a table manifest, camera names
    starting with `_` are scanned, and only memscore's own `_memscore*` entries are left out."""
    import shutil

    folder = tmp_path / "shoot"
    (folder / "day2").mkdir(parents=True)
    shutil.copy(example_images[0], folder / "_DSC0001.JPG")
    shutil.copy(example_images[1], folder / "day2" / "IMG_0002.jpg")
    shutil.copy(example_images[2], folder / ".hidden.png")
    pq.write_table(pa.table({"path": ["x.jpg"]}), folder / "day2" / "exported.parquet")
    (folder / "notes.txt").write_text("notes")
    (folder / "_memscore.json").write_text("{}")  # an earlier memscore output's own files
    (folder / "_memscore").mkdir()
    shutil.copy(example_images[3], folder / "_memscore" / "cached.png")
    manifest = open_manifest(str(folder))
    assert manifest.kind == "images"
    assert sorted(p.rsplit("/", 1)[-1] for p in manifest.files) == [
        ".hidden.png",
        "IMG_0002.jpg",
        "_DSC0001.JPG",
    ]
    assert manifest.skipped_files == 2  # exported.parquet and notes.txt, counted


def test_a_folder_of_only_table_files_is_a_table_manifest(tmp_path):
    folder = tmp_path / "tables"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"path": [f"img{i}.jpg"], "id": [i]}), folder / f"p{i}.parquet")
    (folder / "_SUCCESS").write_text("")  # Spark's marker beside the data
    manifest = open_manifest(str(folder))
    assert manifest.kind == "parquet" and len(manifest.files) == 2
    csvs = tmp_path / "csvs"
    csvs.mkdir()
    (csvs / "a.csv").write_text("path\na.jpg\n")
    (csvs / "b.csv").write_text("path\nb.jpg\n")
    manifest = open_manifest(str(csvs))
    assert manifest.kind == "csv"
    assert sum(t.num_rows for t in manifest.iter_tables()) == 2


def test_streamed_csv_widens_a_column_that_changes_type_in_a_later_block(tmp_path, monkeypatch):
    """The CSV reader streams in blocks and infers types from the first; a word in a later
    block makes the column text, bytes that are not UTF-8 make it binary, as a whole-file read
    would, and no row is lost or doubled by the re-read."""
    import memscore.sources.tables

    monkeypatch.setattr(memscore.sources.tables, "_CSV_BLOCK_BYTES", 4096)  # many blocks
    source = tmp_path / "m.csv"
    lines = [f"img{i}.jpg,{i},{i * 0.5}\n".encode() for i in range(5000)]
    lines[3000] = b"odd.jpg,seven,1.5\n"
    lines[4000] = b"odder.jpg,caf\xe9,2.5\n"
    source.write_bytes(b"path,value,score\n" + b"".join(lines))
    table = snapshot_table(source, tmp_path, rows_per_file=1000)
    assert table.num_rows == 5000
    assert table.column(ROW_COLUMN).to_pylist() == list(range(5000))
    assert table.schema.field("value").type == pa.binary()
    assert table.schema.field("score").type == pa.float64()  # untouched
    assert table.column("value")[3000].as_py() == b"seven"
    assert table.column("value")[4000].as_py() == b"caf\xe9"
    assert table.column("path")[4999].as_py() == "img4999.jpg"


def test_streamed_jsonl_with_a_type_change_in_a_later_block(tmp_path, monkeypatch):
    import memscore.sources.tables

    monkeypatch.setattr(memscore.sources.tables, "_CSV_BLOCK_BYTES", 4096)
    source = tmp_path / "m.jsonl"
    rows = [{"path": f"img{i}.jpg", "value": i} for i in range(3000)]
    rows[2500]["value"] = "many"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = snapshot_table(source, tmp_path, rows_per_file=1000)
    assert table.num_rows == 3000
    assert table.column("value")[2500].as_py() == "many"
    assert table.column("value")[0].as_py() == "0"
