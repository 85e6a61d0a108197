"""Parquet, memscore's output format: a run's rows as Parquet files, written by Ray Data's
Parquet datasink (each file committed through Ray's checkpointing) and read back with pyarrow."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from memscore import storage
from memscore.columns import ERROR as ERROR_COLUMN
from memscore.sinks.base import PART_PREFIX, Sink

__all__ = ["ParquetSink"]


class ParquetSink(Sink):
    """Parquet files of ``--rows-per-file`` rows; every user column keeps its Arrow type."""

    name = "parquet"
    suffix = ".parquet"

    def write(self, dataset, rows_per_file: int) -> None:
        from ray.data.datasource import FilenameProvider

        target, filesystem = storage.for_pyarrow(self.output, self.storage_options)
        # Named memscore-part_<write id>_<task>.parquet: deterministic per write task, as Ray's
        # checkpointing needs, and recognisably memscore's, so --overwrite can tell them apart.
        names = FilenameProvider(dataset_uuid=PART_PREFIX, file_format="parquet")
        # min_rows_per_file: Ray buffers scored blocks until a file's worth is there, then one
        # write task writes the file and commits its row ids (CheckpointConfig): few large
        # files, each committed as soon as it is complete.
        # No CPU in Ray's accounting: Ray Data reserves resources stage by stage, upstream
        # first, and a stage that gets no reservation may start a task only when its CPU
        # request fits in what is left unreserved. On a small machine nothing was left for the
        # writer (one CPU, then a quarter: still more than the few hundredths left), so nothing
        # was written until the read had ended: a 10-million-row run committed no file in 13
        # minutes, with 4.4 million scored rows queued before the writer (docs/scaling.md). A
        # write task encodes a file's worth of metadata and scores: little CPU, and there is
        # one per --rows-per-file rows. With no CPU request, object-store budget alone paces it.
        dataset.write_parquet(
            target,
            filesystem=filesystem,
            filename_provider=names,
            min_rows_per_file=rows_per_file,
            ray_remote_args={"num_cpus": 0},
        )

    def _file(self, path: str) -> pq.ParquetFile:
        return pq.ParquetFile(path, filesystem=storage.pyarrow_filesystem_of(self.fs))

    def schema_of(self, path: str) -> pa.Schema:
        return self._file(path).schema_arrow

    def read_file(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(
            path, columns=columns, filesystem=storage.pyarrow_filesystem_of(self.fs)
        )

    def write_file(self, path: str, table: pa.Table) -> None:
        with self.fs.open(path, "wb") as f:
            pq.write_table(table, f)

    def may_hold_errors(self, path: str) -> bool:
        """False when every row group's statistics count as many nulls in ``memscore_error``
        as it has rows: the footer answers, the rows are not read."""
        meta = self._file(path).metadata
        leaves = [meta.schema.column(i).path for i in range(meta.num_columns)]
        if ERROR_COLUMN not in leaves:
            return False
        index = leaves.index(ERROR_COLUMN)
        for group in range(meta.num_row_groups):
            stats = meta.row_group(group).column(index).statistics
            if (
                stats is None
                or not stats.has_null_count
                or (stats.null_count != meta.row_group(group).num_rows)
            ):
                return True
        return False

    def read(self, columns: list[str], files: list[str] | None = None) -> pa.Table:
        """All files' ``columns`` through ``pyarrow.dataset``: its thread pool reads them (on
        S3, concurrent requests rather than one round trip after another)."""
        import pyarrow.dataset as pads

        from memscore.errors import MemscoreError

        files = self.files() if files is None else files
        data = pads.dataset(
            files, filesystem=storage.pyarrow_filesystem_of(self.fs), format="parquet"
        )
        for column in columns:
            if column not in data.schema.names:
                raise MemscoreError(f"{self.output}: the output has no column {column!r}")
        return data.to_table(columns=columns)
