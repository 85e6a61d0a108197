"""Images inside Parquet: a table whose rows carry their images' bytes in a column, read in place.

Two layouts are common, and both are this kind with no option:

- img2dataset's ``--output_format parquet``: one ``NNNNN.parquet`` per shard with the image
  bytes in a binary column (``jpg``; ``png`` or ``webp`` with other encodings) beside ``key,
  url, caption, status, error_message, width, height, ...``, and a ``NNNNN_stats.json`` beside
  each file;
- a Hugging Face dataset with an ``Image`` feature, as ``datasets``' ``to_parquet`` and the
  Hub's Parquet files store it (``data/train-00000-of-00004.parquet``, a ``README.md`` at the
  top): the image column is ``struct<bytes: binary, path: string>``, the bytes inline (where
  ``bytes`` is null and ``path`` is set, the path is read, relative to the folder given).

What is recognised (``ParquetImages.recognises``): Parquet files (a file, a folder, a glob;
beside them only the sidecars named in ``SIDECARS`` and the table writers' markers) whose first
file has no ``--path-column`` column and holds an image column (``image_columns``: a binary
column, or a struct with a binary ``bytes`` field), or any Parquet files when
``--image-column`` names the column; with ``SIDECARS`` beside the files (a Hub dataset's card),
an image column is enough, whatever the other columns are called. Two image columns and no ``--image-column`` is one line
naming both.

Read in place, never copied: the run's snapshot is the files themselves (``freeze`` reads only
their footers: the row counts), and Ray read tasks (``read_parquet_images``) read them by row
group, in blocks of at most ``DEFAULT_BLOCK_BYTES`` of the file's uncompressed bytes (a larger
row group is cut into several blocks). A read task holds up to about four times its largest
row group, whatever the file's size (pyarrow reads a row group's column chunk whole; img2dataset's
writer leaves a row group's images in one dictionary page), and asks Ray for that memory
(``read_task_memory``), so a node runs no more read tasks at once than it holds. Each row keeps every column except the image column
(``--keep-image-column`` keeps it too, and so copies the images into the output) and gets:

- ``memscore_row`` (int64): ``file << 32 | row`` (``webdataset.sample_id``), where ``file`` is
  the file's place in the sorted listing and ``row`` the row's 0-based place in its file: the
  stable id that resume, the final count and ``memscore verify`` key on, as for shards. Each
  file's row count comes from its footer, so ``--limit N`` takes the first N rows in that
  order and the count check knows every id before anything is read;
- ``memscore_error``: null, or ``"no image: ..."`` for a null image cell (and a row whose
  path could not be read, with its reading error); the decode stage's errors (empty, not an
  image, truncated, decompression bomb) are the same as for files;
- ``__memscore_image``: the image's bytes, internal, decoded and dropped by the decode stage.

Read in the driver (``iter_tables``, for ``memscore finetune``, ``train-sae`` and ``evaluate``):
every column but the image column, whose chunks are never read there (a projection: the labels
and keys of a data set whose images fill gigabytes are read in kilobytes). A training job then
reads the images of the rows it chose (``dataset_of_rows``: the ids ``row_ids`` gives) with
the same read tasks, each keeping only those rows, never in the driver.

A file whose footer cannot be read (a truncated upload) stops the run before anything is
recorded, with one line naming it: once the file is fixed, the same command runs. A file that
fails while it is read (a page damaged, the storage connection lost) stops the run with one
line naming it and how many of its rows were read; ``--resume`` reads it again.

The fingerprint: each file's path, size and ETag (modification time where the store keeps
none), as for WebDataset shards: hashing the images before every run would read the data set.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from memscore import columns, storage
from memscore.errors import MemscoreError, first_line
from memscore.sources.base import (
    BATCH_ROWS,
    Location,
    RowsRead,
    Snapshot,
    Source,
    fingerprint_files,
    local_path,
)
from memscore.sources.checks import check_repeated_columns, check_reserved_columns
from memscore.sources.formats import kind_of
from memscore.sources.snapshot import LIGHT_STAGE_CPUS
from memscore.sources.webdataset import sample_id

__all__ = [
    "ParquetImages",
    "SIDECARS",
    "DEFAULT_BLOCK_BYTES",
    "image_columns",
    "read_parquet_images",
    "plan_reads",
    "read_task_memory",
]

#: Files that may lie beside the Parquet files without making the folder something else:
#: img2dataset's per-shard ``NNNNN_stats.json``, a Hugging Face dataset repository's
#: ``README.md`` (its card) and ``.gitattributes``, and Parquet writers' markers.
SIDECARS = ("_stats.json", "README.md", ".gitattributes", "_SUCCESS", "_metadata")

#: Uncompressed bytes of a block a read task hands on (and of the rows a read task reads):
#: Ray Data's blocks stay under its 128 MiB target, whatever the row size.
DEFAULT_BLOCK_BYTES = 64 * 2**20

IMAGE = columns.IMAGE
#: The image cell's place in the run's ids: rows of one file are ``file << 32 | 0 .. n - 1``.
_MAX_ROWS_PER_FILE = 2**32
#: The buffered reader's read size (pyarrow still holds a binary column chunk whole: see
#: ``read_task_memory``).
_READ_BUFFER = 4 * 2**20
#: Where a run records the files it reads and their rows (``dataset``), for ``rows_read`` and
#: ``memscore verify`` of a run not finished.
_PLAN_FILE = "parquet_files.json"


def image_columns(schema: pa.Schema) -> list[str]:
    """The columns of ``schema`` that can hold images' bytes: binary ones, and structs with a
    binary ``bytes`` field (Hugging Face's ``Image`` feature), in the schema's order.

    >>> image_columns(pa.schema([("key", pa.string()), ("jpg", pa.binary())]))
    ['jpg']
    >>> image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    >>> image_columns(pa.schema([("image", image), ("label", pa.int64())]))
    ['image']
    """
    return [f.name for f in schema if _bytes_type(f.type) is not None]


def _bytes_type(kind: pa.DataType) -> str | None:
    """'binary' for a binary column, 'struct' for a struct with a binary ``bytes``, else None."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "binary"
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        if index >= 0:
            inner = kind.field(index).type
            if pa.types.is_binary(inner) or pa.types.is_large_binary(inner):
                return "struct"
    return None


def _is_sidecar(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(SIDECARS) or (name.startswith(".") and name.endswith(".crc"))


def _parquet_files(location: Location) -> list[str] | None:
    """The location's Parquet files, when they are all it holds beside ``SIDECARS``."""
    listing = location.listing()
    paths = [p for p in listing.paths if not _is_sidecar(p)]
    if paths and all(kind_of(p) == "parquet" for p in paths):
        return paths
    return None


def _footer(fs, path: str):
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata


# ---------------------------------------------------------------------------------- the reads
@dataclass(frozen=True)
class ReadPlan:
    """One read task: rows ``start .. start + rows - 1`` of file ``index`` (``url``), which lie
    in its row groups ``groups``, read in batches of ``batch_rows`` rows."""

    index: int
    url: str
    groups: tuple[int, ...]
    start: int
    rows: int
    batch_rows: int


def plan_reads(
    footers: list, urls: list[str], rows: list[int], block_bytes: int = DEFAULT_BLOCK_BYTES
) -> list[ReadPlan]:
    """The read tasks for ``rows[i]`` rows of each file ``urls[i]`` (its footer
    ``footers[i]``): consecutive row groups together up to ``block_bytes`` of uncompressed
    bytes, a larger row group alone; each read in batches of about ``block_bytes``."""
    plans = []
    for index, (meta, url, wanted) in enumerate(zip(footers, urls, rows)):
        groups: list[int] = []
        first = position = nbytes = whole = 0  # whole: the rows of the groups, read or not
        for group in range(meta.num_row_groups):
            if position >= wanted:
                break
            info = meta.row_group(group)
            if groups and nbytes + info.total_byte_size > block_bytes:
                plans.append(_plan(index, url, groups, first, position, nbytes, whole, block_bytes))
                groups, first, nbytes, whole = [], position, 0, 0
            groups.append(group)
            nbytes += info.total_byte_size
            whole += info.num_rows
            position += min(info.num_rows, wanted - position)
        if groups and position > first:
            plans.append(_plan(index, url, groups, first, position, nbytes, whole, block_bytes))
    return plans


def _plan(index, url, groups, first, end, nbytes, whole, block_bytes) -> ReadPlan:
    per_row = max(1, nbytes // max(1, whole))
    return ReadPlan(index, url, tuple(groups), first, end - first, max(1, block_bytes // per_row))


def read_plan(
    plan: ReadPlan,
    storage_options: Mapping[str, Any] | None,
    *,
    image_column: str,
    keep_image_column: bool,
    schema: pa.Schema,
    base_dir: str,
    wanted=None,
) -> Iterator[pa.Table]:
    """One read task's rows as tables: every column of ``schema`` (the first file's; a later
    file's rows are cast to it) except the image column unless ``keep_image_column``, then
    ``memscore_row``, ``memscore_error`` and ``__memscore_image``; only the rows whose
    ``memscore_row`` is in ``wanted`` (ascending int64) where given, the others dropped as
    soon as read (their images go no further)."""
    import numpy as np
    import pyarrow.parquet as pq

    fs, inner = storage.url_to_fs(plan.url, storage_options)
    row = plan.start
    end = plan.start + plan.rows
    with fs.open(inner, "rb") as f:
        reader = pq.ParquetFile(f, buffer_size=_READ_BUFFER, pre_buffer=False)
        for batch in reader.iter_batches(
            batch_size=plan.batch_rows, row_groups=list(plan.groups), use_threads=False
        ):
            table = pa.Table.from_batches([batch]).slice(0, end - row)
            if table.schema != schema:
                table = table.select(schema.names).cast(schema)
            ids = np.array([sample_id(plan.index, r) for r in range(row, row + table.num_rows)])
            row += table.num_rows
            if wanted is not None:
                keep = np.isin(ids, wanted)
                table, ids = table.filter(pa.array(keep)), ids[keep]
            if table.num_rows:
                yield _rows(table, ids, image_column, keep_image_column, base_dir, storage_options)
            if row >= end:
                return


def _rows(table, ids, image_column, keep, base_dir, storage_options) -> pa.Table:
    import numpy as np
    import pyarrow.compute as pc

    cell = table.column(image_column).combine_chunks()
    errors: list[str | None] = [None] * table.num_rows
    if _bytes_type(cell.type) == "struct":
        data = pc.struct_field(cell, "bytes")
        paths = (
            pc.struct_field(cell, "path")
            if cell.type.get_field_index("path") >= 0
            else pa.nulls(table.num_rows, pa.string())
        )
        data = _read_paths(data, paths, errors, base_dir, storage_options, image_column)
    else:
        data = cell
    data = data.cast(pa.binary()) if data.type != pa.binary() else data
    for i in np.flatnonzero(data.is_null().to_numpy(zero_copy_only=False)):
        if errors[i] is None:
            errors[i] = f"no image: the {image_column} cell is null"
    if not keep:
        table = table.drop_columns([image_column])
    table = table.append_column(columns.ROW, pa.array(ids, pa.int64()))
    table = table.append_column(columns.ERROR, pa.array(errors, pa.string()))
    return table.append_column(IMAGE, data)


def _read_paths(data, paths, errors, base_dir, storage_options, image_column):
    """A struct cell whose ``bytes`` are null and whose ``path`` is set: the file read now
    (relative to ``base_dir``); one that cannot be is its row's error."""
    from memscore.row_errors import ImageDecodeError
    from memscore.stages.fetch import RowFetcher

    wanted = [
        i
        for i, (b, p) in enumerate(zip(data.is_null().to_pylist(), paths.is_valid().to_pylist()))
        if b and p
    ]
    if not wanted:
        return data
    fetcher = RowFetcher(base_dir=base_dir, storage_options=storage_options)
    values = data.to_pylist()
    names = paths.to_pylist()
    for i in wanted:
        try:
            values[i] = fetcher.row_bytes(names[i])
        except ImageDecodeError as exc:
            errors[i] = f"no image: the {image_column} cell has no bytes and its path: {exc}"
    return pa.array(values, pa.binary())


@functools.cache
def _datasource_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ParquetImagesDatasource(Datasource):
        """One read task per ``ReadPlan``; each yields ``read_plan``'s tables as blocks."""

        def __init__(self, plans, storage_options, reader_options, wanted=None):
            super().__init__()
            self.plans = list(plans)
            self.wanted = wanted
            self.storage_options = dict(storage_options or {})
            self.reader_options = dict(reader_options)

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            storage_options, reader_options = self.storage_options, self.reader_options
            tasks = []
            for plan in self.plans:
                wanted = None if self.wanted is None else _ids_in(self.wanted, plan)
                if wanted is not None and not wanted.size:
                    continue  # none of the plan's rows is wanted: its row groups are not read

                def read(plan=plan, wanted=wanted):
                    from memscore.stages.fetch import TransientFailure

                    done = 0
                    try:
                        for table in read_plan(
                            plan, storage_options, wanted=wanted, **reader_options
                        ):
                            done += table.num_rows
                            yield table
                    except (OSError, pa.ArrowException) as exc:
                        # the file or the storage failed, not one image: the run stops with one
                        # line naming the file, and --resume reads its rows again
                        raise TransientFailure(
                            f"reading {plan.url} (rows {plan.start + done} on) failed: "
                            f"{first_line(exc)[:300]}"
                        ) from None

                meta = BlockMetadata(
                    num_rows=plan.rows if wanted is None else int(wanted.size),
                    size_bytes=None,
                    exec_stats=None,
                    input_files=(plan.url,),
                )
                tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
            return tasks

    return ParquetImagesDatasource


def _ids_in(wanted, plan: ReadPlan):
    """The ids of ``wanted`` (ascending) among the plan's rows."""
    import numpy as np

    first = sample_id(plan.index, plan.start)
    lo, hi = np.searchsorted(wanted, [first, first + plan.rows])
    return wanted[lo:hi]


def read_task_memory(footers: list, plans: list[ReadPlan], block_bytes: int) -> int:
    """What one read task can hold at worst, as measured (benchmarks/parquet_images.py,
    PARQUET_IMAGES_RESULTS.md: a 2 GB file of 12 MP JPEGs in img2dataset's row groups of 100
    rows, 297 MiB each, peaked at 1,190 MiB; 100,000 thumbnails at 322 MiB with 64 MiB blocks):
    four times its largest row group (pyarrow reads a row group's binary column chunk whole,
    and img2dataset's writer leaves a row group's images in one dictionary page, read whole and
    then decoded), five blocks (a block and the batches it is cut from) and Python's own."""
    largest = max(
        (
            footers[plan.index].row_group(group).total_byte_size
            for plan in plans
            for group in plan.groups
        ),
        default=0,
    )
    return 4 * largest + 5 * block_bytes + (64 << 20)


def _at_most_half_a_node(memory: int) -> int:
    """``memory``, but never more than half of the largest node's memory: a reservation no node
    can grant would leave the read task waiting for ever (one giant row group)."""
    import ray

    nodes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    largest = max(nodes, default=0)
    return min(memory, int(largest // 2)) if largest else memory


def read_parquet_images(
    plans: list[ReadPlan],
    storage_options,
    num_cpus=None,
    memory=None,
    wanted=None,
    **reader_options,
):
    """The planned reads as a Ray Dataset: one read task per ``ReadPlan``, in order, each
    asking Ray for ``memory`` bytes (None: no reservation); only the rows whose
    ``memscore_row`` is in ``wanted`` (an ascending int64 numpy array) where given, and no
    read task for a plan with none of them."""
    import ray.data

    datasource = _datasource_class()(plans, storage_options, reader_options, wanted)
    extra = {} if memory is None else {"memory": memory}
    return ray.data.read_datasource(
        datasource, override_num_blocks=max(1, len(plans)), num_cpus=num_cpus, **extra
    )


# ---------------------------------------------------------------------------------- the Source
@dataclass(frozen=True)
class ParquetImages(Source):
    """Parquet files whose rows carry their images' bytes in a column (the module docstring):
    read in place by Ray tasks, keyed by file and row, never copied into a snapshot.

    ``path_column`` is the image column (what names each row's image); ``columns`` are the
    first file's. The driver reads the rows without the image column (``columns_in_driver``):
    a command that held them there would hold every image.
    """

    image_column: str = ""
    keep_image_column: bool = False
    #: file -> its footer, read once (``footers``)
    _footers: dict = field(default_factory=dict, repr=False, compare=False)

    kind = "parquet-images"
    what = "images inside Parquet"
    is_table = True
    row_ids_are_positions = False
    images_in_place = True

    @classmethod
    def recognises(cls, location: Location) -> bool:
        files = _parquet_files(location)
        if files is None:
            return False
        if location.image_column:
            return True
        fs, _ = location.filesystem()
        try:
            schema = _footer(fs, files[0]).schema.to_arrow_schema()
        except Exception:
            # unreadable: a folder with sidecars is this kind's, to say so in one line; plain
            # Parquet files are the table reader's, which says so as it always has
            return len(files) < len(location.listing().paths)
        # a folder with a dataset card or img2dataset's stats beside its files is no plain
        # table's (the table readers take nothing but table files), whatever its columns: a
        # path-named column there (evaluate's key) is one of its columns
        beside = len(files) < len(location.listing().paths)
        return (location.path_column not in schema.names or beside) and bool(image_columns(schema))

    @classmethod
    def open(
        cls,
        location: Location,
        *,
        path_column: str,
        reserved_columns: tuple[str, ...],
        image_paths: bool | None,
    ) -> ParquetImages:
        source = location.given
        fs, _ = location.filesystem()
        files = _parquet_files(location) or []
        try:
            schema = _footer(fs, files[0]).schema.to_arrow_schema()
        except Exception as exc:
            raise MemscoreError(
                f"{location.full(files[0])}: cannot read the Parquet footer: {first_line(exc)}"
            ) from None
        names = schema.names
        check_repeated_columns(names, location.full(files[0]))
        found = image_columns(schema)
        chosen = location.image_column
        if chosen:
            if chosen not in names:
                raise MemscoreError(
                    f"{source}: no --image-column {chosen!r} (columns: {', '.join(names)})"
                )
            if chosen not in found:
                raise MemscoreError(
                    f"{source}: --image-column {chosen!r} is {schema.field(chosen).type}, not "
                    f"image bytes (binary, or a struct with a binary 'bytes' field)"
                )
        elif len(found) > 1:
            raise MemscoreError(
                f"{source}: {len(found)} columns hold bytes ({', '.join(found)}); name the "
                f"image column with --image-column"
            )
        elif not found:
            raise MemscoreError(
                f"{source}: no column {path_column!r} and no image column (binary, or a struct "
                f"with a 'bytes' field) (columns: {', '.join(names)}); name the image column "
                f"with --path-column or --image-column"
            )
        else:
            chosen = found[0]
        check_reserved_columns(
            [n for n in names if n != chosen or location.keep_image_column],
            reserved_columns,
            source,
        )
        return cls(
            source,
            tuple(location.full(p) for p in files),
            location.listing().base_dir,
            tuple(names),
            chosen,
            location.storage_options,
            image_column=chosen,
            keep_image_column=location.keep_image_column,
        )

    # -- what it is -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        return fingerprint_files(self.files, self.storage_options, by_content=False)

    def footers(self) -> list:
        """Every file's footer (read once, 32 at a time); one line naming a file whose footer
        cannot be read, or whose columns differ from the first file's."""
        missing = [url for url in self.files if url not in self._footers]

        def read(url: str):
            fs, inner = storage.url_to_fs(url, self.storage_options)
            try:
                return url, _footer(fs, inner)
            except Exception as exc:
                return url, exc

        with ThreadPoolExecutor(max_workers=32) as pool:
            for url, meta in pool.map(read, missing):
                if isinstance(meta, Exception):
                    raise MemscoreError(
                        f"{url}: cannot read the Parquet footer ({type(meta).__name__}: "
                        f"{first_line(meta)[:200]}); fix or remove the file and run the same "
                        f"command again"
                    )
                names = meta.schema.to_arrow_schema().names
                if names != list(self.columns):
                    raise MemscoreError(
                        f"{url}: columns {names} differ from the first Parquet file's "
                        f"{list(self.columns)}"
                    )
                if meta.num_rows >= _MAX_ROWS_PER_FILE:
                    raise MemscoreError(f"{url}: {meta.num_rows} rows, more than a file may have")
                self._footers[url] = meta
        return [self._footers[url] for url in self.files]

    def row_counts(self, rows: int | None = None) -> list[int]:
        """Each file's rows, from its footer; the first ``rows`` only when given."""
        counts = [meta.num_rows for meta in self.footers()]
        if rows is None:
            return counts
        cut, left = [], rows
        for n in counts:
            cut.append(min(n, left))
            left -= cut[-1]
        return cut

    # -- read in the driver: without the images --------------------------------------------
    @property
    def columns_in_driver(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c != self.image_column)

    def file_tables(self, columns: tuple[str, ...] | None = None) -> Iterator[tuple[str, pa.Table]]:
        """Each file's rows, ``columns`` (by default ``columns_in_driver``) read alone: the
        image column's chunks are never read here."""
        import pyarrow.parquet as pq

        wanted = list(self.columns_in_driver if columns is None else columns)
        if self.image_column in wanted:
            raise MemscoreError(
                f"{self.source}: the image column {self.image_column!r} is read by Ray tasks, "
                f"not in the driver"
            )
        for url in self.files:
            fs, inner = storage.url_to_fs(url, self.storage_options)
            try:
                with fs.open(inner, "rb") as f:
                    reader = pq.ParquetFile(f)
                    for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                        yield url, pa.Table.from_batches([batch])
            except (OSError, pa.ArrowException) as exc:
                raise MemscoreError(
                    f"{url}: cannot read the Parquet file: {first_line(exc)[:300]}"
                ) from None

    def row_ids(self, rows: int) -> pa.Array:
        """``file << 32 | row`` of the first ``rows`` rows, from the files' footers."""
        import numpy as np

        ids = [
            (index << 32) + np.arange(n, dtype=np.int64)
            for index, n in enumerate(self.row_counts(rows))
            if n
        ]
        return pa.array(np.concatenate(ids) if ids else np.zeros(0, np.int64), pa.int64())

    def dataset_of_rows(self, row_ids: pa.Array):
        """The rows ``row_ids`` read in place by the run's read tasks (``read_parquet_images``),
        each task keeping only its wanted rows; a plan with none is not read at all."""
        import numpy as np

        footers = self.footers()
        plans = plan_reads(footers, list(self.files), self.row_counts())
        wanted = np.unique(np.asarray(row_ids.to_numpy(zero_copy_only=False), np.int64))
        return read_parquet_images(
            plans,
            self.storage_options,
            num_cpus=LIGHT_STAGE_CPUS,
            memory=_at_most_half_a_node(read_task_memory(footers, plans, DEFAULT_BLOCK_BYTES)),
            wanted=wanted,
            image_column=self.image_column,
            keep_image_column=self.keep_image_column,
            schema=footers[0].schema.to_arrow_schema(),
            base_dir=self.base_dir,
        )

    # -- a scoring run ------------------------------------------------------------------------
    def check_run_options(self, *, limit: int | None, id_column: str | None) -> None:
        if id_column:
            raise MemscoreError(
                f"{self.source}: --id-column is for table manifests with a path column; rows "
                f"of images inside Parquet are keyed by file and row (memscore_row)"
            )

    def freeze(
        self, folder: str, *, limit: int | None, rows_per_file: int, id_column: str | None
    ) -> Snapshot:
        """The files themselves, never copied; their footers are read here, so a file that
        cannot be read stops the run before its state is recorded."""
        total = sum(self.row_counts())
        if not total:
            raise MemscoreError(f"{self.source}: the manifest has no rows")
        return Snapshot(self.files, total if limit is None else min(limit, total))

    def dataset(self, snapshot: Snapshot, *, reserved_columns: tuple[str, ...], counts_folder: str):
        import pyarrow.parquet as pq  # noqa: F401  (the read tasks' reader)

        footers = self.footers()
        rows = self.row_counts(snapshot.rows)
        self._record(counts_folder, rows)
        plans = plan_reads(footers, list(self.files), rows)
        return read_parquet_images(
            plans,
            self.storage_options,
            # reading is sequential I/O and page decoding: a light share, as the snapshot's
            num_cpus=LIGHT_STAGE_CPUS,
            # reserved, so that a node runs no more read tasks at once than its memory holds
            memory=_at_most_half_a_node(read_task_memory(footers, plans, DEFAULT_BLOCK_BYTES)),
            image_column=self.image_column,
            keep_image_column=self.keep_image_column,
            schema=footers[0].schema.to_arrow_schema(),
            base_dir=self.base_dir,
        )

    def _record(self, counts_folder: str, rows: list[int]) -> None:
        fs, path = storage.url_to_fs(
            f"{counts_folder.rstrip('/')}/{_PLAN_FILE}", self.storage_options
        )
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        storage.pipe_atomic(fs, path, json.dumps(self._files_record(rows)).encode())

    def _files_record(self, rows: list[int]) -> list[dict[str, Any]]:
        return [{"url": url, "rows": n} for url, n in zip(self.files, rows)]

    def image_reading(self) -> dict[str, Any]:
        # the image's bytes travel in the row
        return {"path_column": self.path_column, "bytes_column": IMAGE, "confine_to": None}

    def rows_read(self, snapshot: Snapshot, counts_folder: str, *, output: str) -> RowsRead:
        recorded = self._recorded(counts_folder)
        if recorded is None:
            raise MemscoreError(
                f"{output}: the run recorded no plan of the Parquet files it reads, so the "
                f"output cannot be checked; run again with --resume"
            )
        rows = [item["rows"] for item in recorded]
        return RowsRead(sum(rows), rows, {"parquet_files": recorded})

    def _recorded(self, counts_folder: str) -> list[dict[str, Any]] | None:
        fs, path = storage.url_to_fs(
            f"{counts_folder.rstrip('/')}/{_PLAN_FILE}", self.storage_options
        )
        if not fs.exists(path):
            return None
        return json.loads(fs.cat_file(path))

    def recorded_rows(
        self, output: str, *, summary: Mapping[str, Any] | None, counts_folder: str, by_name: bool
    ) -> list[int]:
        """Each file's rows as the run planned them (its summary's ``parquet_files``, or its
        work folder's record for a run not finished), checked to be the files named here."""
        recorded = (
            summary.get("parquet_files") if summary is not None else self._recorded(counts_folder)
        )
        if recorded is None:
            raise MemscoreError(
                f"{output}: the run did not read images inside Parquet"
                if summary is not None
                else f"{output}: the run has not started reading {self.source}; finish it "
                f"with --resume"
            )
        urls, files = [item["url"] for item in recorded], list(self.files)
        if by_name:
            urls = [u.rsplit("/", 1)[-1] for u in urls]
            files = [u.rsplit("/", 1)[-1] for u in files]
        if urls != files:
            raise MemscoreError(
                f"{output}: the run read {len(urls)} Parquet files, {self.source} names "
                f"{len(files)} (or others); give the files the run was given"
            )
        return [int(item["rows"]) for item in recorded]

    def first_local_files(self, count: int, *, rows: int) -> list[str]:
        """The local Parquet files: what every node's read tasks open."""
        return [p for p in self.files if local_path(p) and os.path.isfile(local_path(p))][:count]
