"""JSON lines, an output format for tools that read no Parquet: one JSON object per row, in
files of ``--rows-per-file`` rows, written by Ray Data's JSON datasink (through pandas) and
read back with pyarrow's JSON reader (``--output-format jsonl``).

What it costs against Parquet: the files are several times larger and slower to read, and
JSON keeps no Arrow types: a float32 score comes back as a float64 of the same value (pandas
writes 10 significant digits, more than float32's 7), a column of nulls has no type, bytes
cannot be written at all. Parquet stays the default.

This module is docs/architecture.md's worked example of a new output format: this file and
its line in ``memscore.sinks.SINKS``.
"""

from __future__ import annotations

import json

import pyarrow as pa

from memscore import storage
from memscore.columns import ERROR as ERROR_COLUMN, ROW as ROW_COLUMN
from memscore.sinks.base import PART_PREFIX, Sink

__all__ = ["JsonLinesSink"]

# memscore's own columns keep their types whatever a file holds (a file whose rows all scored
# has only nulls in memscore_error, which JSON alone cannot type).
_OWN_TYPES = pa.schema([(ROW_COLUMN, pa.int64()), (ERROR_COLUMN, pa.string())])


class JsonLinesSink(Sink):
    """JSON-lines files, one object per row."""

    name = "jsonl"
    suffix = ".jsonl"
    holds_bytes = False  # JSON holds text

    def write(self, dataset, rows_per_file: int) -> None:
        from ray.data.datasource import FilenameProvider

        target, filesystem = storage.for_pyarrow(self.output, self.storage_options)
        dataset.write_json(
            target,
            filesystem=filesystem,
            # memscore-part_<write id>_<task>.jsonl, as ParquetSink names its files
            filename_provider=FilenameProvider(dataset_uuid=PART_PREFIX, file_format="jsonl"),
            min_rows_per_file=rows_per_file,
            ray_remote_args={"num_cpus": 0},  # why: ParquetSink.write
        )

    def read_file(self, path: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.json as pajson

        with self.fs.open(path, "rb") as f:
            table = pajson.read_json(
                f,
                parse_options=pajson.ParseOptions(
                    explicit_schema=_OWN_TYPES, unexpected_field_behavior="infer"
                ),
            )
        return table if columns is None else table.select(columns)

    def schema_of(self, path: str) -> pa.Schema:
        return self.read_file(path).schema

    def write_file(self, path: str, table: pa.Table) -> None:
        with self.fs.open(path, "wb") as f:
            for row in table.to_pylist():
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
