"""The manifest's frozen copy that a scoring run reads, and the kinds whose runs read one.

A source streams its rows as tables (``Source.iter_tables``); a run of a ``SnapshotSource``
(tables, image folders) then copies those rows once, in order, into Parquet parts of its own
(``write_snapshot``), each row numbered with ``memscore_row`` (its 0-based position: the stable
row id, so duplicated paths stay separate rows), and Ray Data reads the parts
(``snapshot_dataset``), never the manifest: one reader for every such kind, an exact row count,
a deterministic ``--limit``, and an input that cannot change under a resumed run. WebDataset
shards are not copied: their ``Snapshot`` names the shards themselves. Where the parts live,
and the rest of a run's state, is ``resume.py``'s.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from memscore import columns, storage
from memscore.errors import MemscoreError
from memscore.sources.base import (
    RowsRead,
    Snapshot,
    Source,
    local_path,
    read_restarting,
)
from memscore.sources.checks import check_path_column, repeated_values
from memscore.stages.pipeline import LIGHT_STAGE_CPUS

__all__ = [
    "ROW_COLUMN",
    "Snapshot",
    "SnapshotSource",
    "write_snapshot",
    "snapshot_dataset",
    "LIGHT_STAGE_CPUS",
]

ROW_COLUMN = columns.ROW
# Parallel PUTs when the snapshot goes to S3: thousands of small parts, each a round trip.
_WRITE_THREADS = 8


def write_snapshot(
    manifest: Source,
    folder: str,
    *,
    limit: int | None = None,
    rows_per_file: int,
    id_column: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Snapshot:
    """Copy the manifest's rows (the first ``limit``) into ``folder`` as
    ``part-NNNNNN.parquet`` files of ``rows_per_file`` rows, each row numbered in
    ``memscore_row``. Streams: the driver holds a few parts at a time.

    Args:
        manifest: the opened manifest (``memscore.sources.manifest.open_manifest``).
        folder: where the parts go (a run's ``resume.snapshot_folder(output)``); parts a
            killed earlier attempt left there are replaced, nothing else in it is touched.
        limit: the run's ``--limit`` (None: every row).
        rows_per_file: rows per part (the run's ``--rows-per-file``).
        id_column: the run's ``--id-column``, checked unique and non-empty over the whole
            manifest (None: no check).
        storage_options: fsspec options for ``folder`` (None: the manifest's).

    Raises:
        MemscoreError: what only the whole manifest shows (``open_manifest`` has checked its
            schema and first block): a later block that does not parse, a later file whose
            columns or types differ from the first's, a path column that is not text (bytes
            that are not UTF-8 past the first block), an ``--id-column`` with empty or
            repeated values. The parts this call wrote and the folders it made go first
            (nothing else: they are empty by then), so the output is as the run found it
            and the corrected command needs neither ``--resume`` nor ``--overwrite``.
    """
    options = manifest.storage_options if storage_options is None else storage_options
    fs, inner = storage.url_to_fs(folder, options)
    made = [] if storage.is_url(folder) else _missing_folders(inner)
    written: list[str] = []
    try:
        return read_restarting(
            lambda: _write_snapshot(
                manifest,
                folder,
                written,
                limit=limit,
                rows_per_file=rows_per_file,
                id_column=id_column,
                storage_options=options,
            )
        )
    except Exception:
        _remove_own(fs, written, made)
        raise


def _missing_folders(path: str) -> list[str]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_own(fs, parts: list[str], folders: list[str]) -> None:
    """Delete the snapshot parts a refused attempt wrote, then the folders it made if they
    are empty (``os.rmdir`` removes nothing else)."""
    try:
        if parts:
            try:
                fs.rm(parts)  # on S3 one bulk request per 1,000 parts
            except FileNotFoundError:  # a local part whose write failed before it existed
                for part in parts:
                    if fs.exists(part):
                        fs.rm_file(part)
        for folder in folders:
            os.rmdir(folder)
    except Exception:
        # The refusal is what the user must read; parts left behind by a failed cleanup are
        # a cut-short snapshot, which --resume starts afresh.
        pass


def _write_snapshot(
    manifest: Source,
    folder_url: str,
    written: list[str],
    *,
    limit: int | None,
    rows_per_file: int,
    id_column: str | None,
    storage_options: Mapping[str, Any],
) -> Snapshot:
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    # parts of an attempt cut short by a kill (or read again with a widened column)
    stale = fs.glob(f"{folder}/part-*.parquet") if fs.exists(folder) else []
    if stale:
        fs.rm(stale)
    written.clear()
    if not storage.is_url(folder_url):
        fs.makedirs(folder, exist_ok=True)
    ids: list[pa.ChunkedArray] = []
    files: list[str] = []
    rows = 0

    def put(path: str, table: pa.Table) -> None:
        with fs.open(path, "wb") as f:
            pq.write_table(table, f)

    with ThreadPoolExecutor(_WRITE_THREADS) as pool:
        writes: deque = deque()
        for block in _blocks(manifest.iter_tables(limit), rows_per_file):
            if rows == 0:  # a later block cannot change a type without a restart
                check_path_column(block.schema, manifest.path_column, manifest.source)
            block = block.append_column(
                ROW_COLUMN, pa.array(range(rows, rows + block.num_rows), pa.int64())
            )
            if id_column:
                ids.append(block.column(id_column))
            part = f"{folder}/part-{len(files):06d}.parquet"
            written.append(part)  # before the write: one cut short is deleted too
            writes.append(pool.submit(put, part, block))
            while len(writes) > _WRITE_THREADS:  # bounded: reading waits for slow writes
                writes.popleft().result()
            files.append(storage.join(folder_url, f"part-{len(files):06d}.parquet"))
            rows += block.num_rows
        for write in writes:
            write.result()
    if id_column:
        _check_unique_ids(
            pa.chunked_array([c for a in ids for c in a.chunks]), id_column, manifest.source
        )
    return Snapshot(tuple(files), rows)


def _blocks(tables, rows_per_block: int):
    """Re-cut a stream of tables into tables of exactly ``rows_per_block`` rows (the last fewer)."""
    pending: list[pa.Table] = []
    count = 0
    for table in tables:
        pending.append(table)
        count += table.num_rows
        while count >= rows_per_block:
            merged = pa.concat_tables(pending)
            yield merged.slice(0, rows_per_block).combine_chunks()
            rest = merged.slice(rows_per_block)
            pending, count = [rest], rest.num_rows
    if count:
        yield pa.concat_tables(pending).combine_chunks()


def _check_unique_ids(ids: pa.ChunkedArray, column: str, source: str) -> None:
    if ids.null_count:
        raise MemscoreError(f"{source}: --id-column {column!r} has {ids.null_count} empty values")
    repeated = repeated_values(ids)
    if repeated:
        kinds, value, times = repeated
        raise MemscoreError(
            f"{source}: --id-column {column!r} is not unique: {kinds} values "
            f"repeat, e.g. {value!r} ({times} times)"
        )


def snapshot_dataset(snapshot: Snapshot, storage_options: Mapping[str, Any]):
    """The snapshot as a Ray Dataset: one read block per part (the unit of a decode task)."""
    import ray.data
    from ray.data import DataContext

    paths, filesystem = storage.for_pyarrow(list(snapshot.files), storage_options)
    # Ray's first Parquet reader (V1): memscore wrote these files and knows them, so the V2
    # reader's footer-indexing actors (three more Python processes, ~4 s of CPU on a 2-core
    # machine, while the model actor is starting) buy nothing here. Both honour the checkpoint.
    context = DataContext.get_current()
    chosen, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        # A light CPU share: reading the snapshot is cheap, and a whole CPU held by a read
        # that backpressure keeps alive for most of a long run is a CPU the decode tasks lack
        # (pipeline.light_cpu_share).
        return ray.data.read_parquet(
            paths, filesystem=filesystem, override_num_blocks=len(paths), num_cpus=LIGHT_STAGE_CPUS
        )
    finally:
        context.use_datasource_v2 = chosen


class SnapshotSource(Source):
    """A kind whose rows a run copies once into its snapshot (``write_snapshot``) and numbers by
    position, ``0 .. N-1``: tables and image folders. Its rows name their images by path,
    resolved against ``base_dir``; it takes ``--limit`` (the first N rows) and ``--id-column``.
    """

    row_ids_are_positions = True

    def check_run_options(self, *, limit: int | None, id_column: str | None) -> None:
        return None  # both are rows of the snapshot: the first N, a column of it

    def freeze(
        self, folder: str, *, limit: int | None, rows_per_file: int, id_column: str | None
    ) -> Snapshot:
        return write_snapshot(
            self, folder, limit=limit, rows_per_file=rows_per_file, id_column=id_column
        )

    def dataset(self, snapshot: Snapshot, *, reserved_columns: tuple[str, ...], counts_folder: str):
        return snapshot_dataset(snapshot, self.storage_options)

    def image_reading(self) -> dict[str, Any]:
        return {"path_column": self.path_column, "bytes_column": None, "confine_to": None}

    def rows_read(self, snapshot: Snapshot, counts_folder: str, *, output: str) -> RowsRead:
        return RowsRead(snapshot.rows, snapshot.rows)  # the snapshot counted them

    def recorded_rows(
        self, output: str, *, summary: Mapping[str, Any] | None, counts_folder: str, by_name: bool
    ) -> None:
        return None  # positions: verify counts the manifest's rows itself

    def first_local_files(self, count: int, *, rows: int) -> list[str]:
        """The local images among the first ``rows`` rows' paths (resolved against
        ``base_dir``); one the driver cannot read is that row's error, not a cluster problem."""
        from memscore.row_errors import ImageDecodeError
        from memscore.stages.fetch import resolve_path

        found: list[str] = []
        for table in self.read_all(limit=rows):
            for path in table.column(self.path_column).to_pylist():
                try:
                    local = local_path(resolve_path(path, self.base_dir))
                except ImageDecodeError:
                    continue
                if (
                    local
                    and local not in found
                    and os.path.isfile(local)
                    and os.access(local, os.R_OK)
                ):
                    found.append(local)
                    if len(found) == count:
                        return found
        return found
