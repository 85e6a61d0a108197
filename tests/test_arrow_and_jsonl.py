"""The house's worked examples, held to what docs/architecture.md says of them: a manifest
format added as one module (``sources/arrow.py``: Arrow IPC files and streams) and an output
format added as one module (``sinks/jsonl.py``), each with its registration lines, and every
command (score, --resume, verify, evaluate) working with them through the interfaces alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.feather as feather
import pytest

import memscore
from memscore.errors import MemscoreError
from memscore.sinks import SINKS, format_in, open_sink, sink_class
from memscore.sources.formats import kind_of
from memscore.sources.manifest import KINDS, open_manifest


def _table(paths):
    return pa.table(
        {
            "path": [str(p) for p in paths],
            "label": pa.array(range(len(paths)), pa.int16()),
            "truth": [0.5 + 0.05 * i for i in range(len(paths))],
            "tags": [["a"] * (i % 3) for i in range(len(paths))],
        }
    )


def _write_stream(table: pa.Table, path) -> None:
    """The IPC stream format, as Hugging Face datasets writes its .arrow files."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)


# ------------------------------------------------------------------------------ the source
def test_the_arrow_kind_is_registered_with_its_suffixes():
    assert "arrow" in {source.kind for source in KINDS}
    assert [kind_of(f"m{s}") for s in (".arrow", ".feather", ".IPC")] == ["arrow"] * 3


@pytest.mark.parametrize("writer", ["feather", "file", "stream"])
def test_an_arrow_manifest_is_read_with_its_types(writer, tmp_path, example_images):
    table = _table(example_images)
    path = tmp_path / ("m.feather" if writer == "feather" else "m.arrow")
    if writer == "feather":
        feather.write_feather(table, str(path), chunksize=2)
    elif writer == "file":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table, max_chunksize=2)
    else:
        _write_stream(table, path)
    source = open_manifest(str(path), path_column="path")
    assert source.kind == "arrow" and source.is_table
    read = pa.concat_tables(source.iter_tables())
    assert read.equals(table)  # int16 and list<string> kept, every row, in order
    assert [t.num_rows for t in source.iter_tables()] == [2, 2, 1]  # batch by batch
    assert len(pa.concat_tables(source.iter_tables(limit=3))) == 3


def test_a_folder_of_arrow_files_and_the_manifest_checks(tmp_path, example_images):
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_stream(_table(example_images[:2]), folder / "data-00000-of-00002.arrow")
    _write_stream(_table(example_images[2:]), folder / "data-00001-of-00002.arrow")
    source = open_manifest(str(folder), path_column="path")
    assert source.kind == "arrow" and sum(t.num_rows for t in source.iter_tables()) == 5
    with pytest.raises(MemscoreError, match="no column 'image'.*--path-column"):
        open_manifest(str(folder), path_column="image")
    empty = tmp_path / "empty.arrow"
    _write_stream(_table(example_images).slice(0, 0), empty)
    with pytest.raises(MemscoreError, match="the manifest has no rows"):
        open_manifest(str(empty), path_column="path")
    broken = tmp_path / "broken.feather"
    broken.write_bytes(b"ARROW1" + b"\0" * 20)
    with pytest.raises(MemscoreError, match="cannot read the manifest"):
        open_manifest(str(broken), path_column="path")


# -------------------------------------------------------------------------------- the sink
def test_the_jsonl_sink_is_registered_and_an_unknown_format_is_one_line(tmp_path):
    assert list(SINKS) == ["parquet", "jsonl"] and sink_class("jsonl").suffix == ".jsonl"
    with pytest.raises(MemscoreError, match="--output-format must be one of parquet, jsonl"):
        sink_class("csv")
    done = subprocess.run(
        [sys.executable, "-m", "memscore.cli", "score", "x.csv", "--output", str(tmp_path / "o"),
         "--output-format", "csv"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "invalid choice: 'csv'" in done.stderr


def test_jsonl_refuses_to_keep_image_bytes_before_any_work():
    config = memscore.ScoreConfig(
        "hub/", output="out", output_format="jsonl", keep_image_column=True
    )
    with pytest.raises(MemscoreError, match="--keep-image-column keeps each image's bytes"):
        config.validated()


def test_a_jsonl_file_reads_back_with_memscore_s_types(tmp_path):
    sink = open_sink(str(tmp_path), output_format="jsonl")
    path = str(tmp_path / "memscore-part_x_000000.jsonl")
    table = pa.table(
        {
            "path": ["a.jpg", "b.jpg"],
            "memscore_row": pa.array([0, 1], pa.int64()),
            "memorability": pa.array([0.7744316, None], pa.float32()),
            "memscore_error": pa.array([None, None], pa.string()),  # all null: no JSON type
        }
    )
    sink.write_file(path, table)
    assert sink.files() == [path] and format_in(str(tmp_path)) == "jsonl"
    assert open_sink(str(tmp_path)).name == "jsonl"  # found from the files there
    assert sink.schema_of(path).field("memscore_error").type == pa.string()
    read = sink.read_file(path, ["memscore_row", "memorability", "memscore_error"])
    assert read.column("memscore_row").to_pylist() == [0, 1]
    assert read.column("memorability").to_pylist()[0] == pytest.approx(0.7744316, abs=1e-7)
    tally = sink.count(["memorability"], expected_rows=2)
    assert tally["complete"] and tally["rows_scored"] == 1 and tally["rows_with_errors"] == 0


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_an_arrow_manifest_scored_into_jsonl_then_resumed_verified_and_evaluated(
    ray_local, tmp_path, example_images, reference_scores, capsys
):
    from memscore.cli import main as cli_main

    table = _table(example_images)
    manifest = tmp_path / "m.arrow"
    _write_stream(table, manifest)
    out = tmp_path / "out"
    summary = memscore.score(
        memscore.ScoreConfig(str(manifest), output=str(out), output_format="jsonl", batch_size=4)
    )
    assert summary["rows_scored"] == 5 and summary["rows_with_errors"] == 0
    files = sorted(out.glob("memscore-part_*.jsonl"))
    assert files and not list(out.glob("*.parquet"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(r["memscore_row"] for r in rows) == list(range(5))
    for row in rows:  # every column of the manifest back, the published package's score
        assert row["label"] == table.column("label")[row["memscore_row"]].as_py()
        assert row["tags"] == table.column("tags")[row["memscore_row"]].as_py()
        name = row["path"].rsplit("/", 1)[-1]
        assert row["memorability"] == pytest.approx(reference_scores[name], abs=1e-5)

    capsys.readouterr()
    # --resume without --output-format keeps the run's format: nothing to do
    assert cli_main(["score", str(manifest), "--output", str(out), "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    # another format for the same output is another run: refused, the files untouched
    assert cli_main(["score", str(manifest), "--output", str(out), "--resume",
                     "--output-format", "parquet"]) == 2  # fmt: skip
    assert "output_format was 'jsonl', now 'parquet'" in capsys.readouterr().err
    assert sorted(out.glob("memscore-part_*.jsonl")) == files

    assert cli_main(["verify", str(out), "--manifest", str(manifest)]) == 0
    assert "OK: every manifest row is in the output exactly once" in capsys.readouterr().out
    # a row lost from the files is what verify is for
    kept = files[0].read_text().splitlines()
    files[0].write_text("\n".join(kept[1:]) + "\n")
    assert cli_main(["verify", str(out), "--manifest", str(manifest)]) == 1
    files[0].write_text("\n".join(kept) + "\n")

    report = tmp_path / "report"
    assert cli_main(["evaluate", str(out), "--truth", str(manifest), "--truth-column", "truth",
                     "--key", "path", "--report", str(report)]) == 0  # fmt: skip
    assert "evaluated 5 of 5 matched rows" in capsys.readouterr().out
    assert (report / "metrics.json").exists()
