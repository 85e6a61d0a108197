"""Table manifests: CSV (and TSV), Parquet, JSON lines; a file, a folder of them, or a glob.

``TableSource`` is what the three formats share: a location whose files are all of its format
(``formats.kind_of``), the checks on the schema and first block before any output is written,
the streamed read in bounded memory, the fingerprint by content. Each format is one small class
below it that reads a file (``read_file``) and peeks at its first block (``peek``) the same way.
User columns keep their Arrow types end to end.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from memscore import storage
from memscore.errors import MemscoreError, first_line
from memscore.sources.base import (
    BATCH_ROWS,
    ColumnWidened,
    Location,
    fingerprint_files,
    is_local,
)
from memscore.sources.checks import (
    check_path_column,
    check_repeated_columns,
    check_reserved_columns,
    repeated_columns_line,
)
from memscore.sources.formats import kind_of
from memscore.sources.snapshot import SnapshotSource

__all__ = ["TableSource", "ParquetTables", "CsvTables", "JsonLinesTables"]

# Text bytes per parsed block: it bounds the driver's memory whatever the manifest's size.
# pyarrow's own default block, 1 MiB: measured on a 10M-row CSV, the streaming reader's peak RSS
# grows with the block (132 MB at 1 MiB, 271 MB at 4 MiB, 713 MB at 16 MiB), not with the file.
_CSV_BLOCK_BYTES = 1 << 20
_CSV_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error")
_JSON_REPEATED_KEY = re.compile(r"Column\(/(.*)\) was specified twice")


class TableSource(SnapshotSource):
    """A table manifest of one format: its rows and columns are the user's.

    Rows are streamed in bounded memory, whatever the manifest's size: Parquet by record
    batch, CSV and JSON lines by pyarrow's block readers. Types are what Arrow infers for the
    whole file, as ``pyarrow.csv.read_csv`` would: a streaming reader infers them from the
    first block, so when a later block does not convert (a word in a column of numbers, bytes
    that are not UTF-8) the column is widened (to text, then to ``binary``; nothing is lost)
    and ``ColumnWidened`` is raised: the caller reads again from the start
    (``read_restarting``). A JSON-lines column whose values change type becomes a string
    column of the values' JSON text.

    The fingerprint: each local file's path and the sha256 of its bytes (an edit in place is
    seen even when it keeps the size and puts the modification time back: ``os.utime``, a copy
    with ``cp -p``, a restore from a backup); on an object store each object's path, size and
    ETag, the content hash the store keeps, with one HEAD per object (32 at a time) instead of
    the bytes. (A multipart upload's ETag is not the MD5 of the whole object, but it changes
    with the bytes.) Cost: one read of the files; measured on a 1.0 GB CSV (10.4 million rows)
    on a 2-core AMD EPYC VM (sha256 in hardware, about 1.3 GB/s): 0.7 s from the page cache,
    1.2 s with the file's pages dropped from it (this VM's disk reads at about 3 GB/s; a disk
    reading 200 MB/s would make it the read's 5 s). The snapshot of the same file took 8 s;
    the size-and-mtime stamp that the hash replaces took 15 microseconds a file.
    """

    is_table = True
    #: Whether the first file's schema names the columns even when it has no row (a Parquet
    #: footer does); else the first file with a row does (a text file's header may be absent).
    columns_from_first_file: ClassVar[bool] = False

    # -- found and opened ---------------------------------------------------------------------
    @classmethod
    def _files_of(cls, location: Location) -> list[str] | None:
        """The location's files when all are of this format (a folder's table markers aside)."""
        listing = location.listing()
        paths = list(listing.paths)
        if listing.shape == "folder":
            paths = [p for p in paths if not _table_marker(p)]
        if paths and all(kind_of(p) == cls.kind for p in paths):
            return paths
        return None

    @classmethod
    def recognises(cls, location: Location) -> bool:
        return cls._files_of(location) is not None

    @classmethod
    def open(
        cls,
        location: Location,
        *,
        path_column: str,
        reserved_columns: tuple[str, ...],
        image_paths: bool | None,
    ) -> TableSource:
        """Everything the schema and the first block show is checked here, before any output
        is written: repeated column names, no rows, no path column, a column memscore would
        overwrite, a path column that is not text, a first block that does not parse."""
        source = location.given
        fs, _ = location.filesystem()
        files = [location.full(p) for p in cls._files_of(location)]
        file, schema, typed, has_rows = cls._first_block(files, fs, source)
        columns = schema.names
        check_repeated_columns(columns, file)
        if not has_rows:
            raise MemscoreError(f"{source}: the manifest has no rows")
        if path_column not in columns:
            raise MemscoreError(
                f"{source}: no column {path_column!r} (columns: {', '.join(columns)}); "
                f"name the image column with --path-column"
            )
        check_reserved_columns(columns, reserved_columns, source)
        if typed and (bool(reserved_columns) if image_paths is None else image_paths):
            check_path_column(schema, path_column, source)
        return cls(
            source,
            tuple(files),
            location.listing().base_dir,
            tuple(columns),
            path_column,
            location.storage_options,
        )

    @classmethod
    def _first_block(cls, files: list[str], fs, source: str) -> tuple[str, pa.Schema, bool, bool]:
        """What a streamed read of the manifest starts with: (the file whose columns it takes,
        its schema, whether that schema's types are the ones the read will give, whether the
        manifest has a row).

        The types are those of the first block, read as ``iter_tables`` reads it (a Parquet
        file's own schema; a CSV or JSON-lines file's first block, inferred), so what the
        snapshot's first block would show is seen here, before the output is touched. A
        JSON-lines block whose values change type is read whole later, as text
        (``_read_json_mixed``): its types are then not known here.
        """
        first = None
        file = files[0]
        try:
            for file in files:  # stop at the first file with a row: only emptiness matters
                schema, typed, has_rows = cls.peek(fs, _strip(file))
                if first is None:
                    first = (file, schema, typed)
                taken = first if cls.columns_from_first_file else (file, schema, typed)
                if has_rows:
                    return (*taken, True)
            return (*taken, False)
        except MemscoreError:
            raise
        except Exception as exc:
            key = _repeated_json_key(exc)
            if key is not None:
                raise MemscoreError(repeated_columns_line(file, [key], json=True)) from None
            raise MemscoreError(f"{source}: cannot read the manifest: {first_line(exc)}") from None

    @classmethod
    @abc.abstractmethod
    def peek(cls, fs, path: str) -> tuple[pa.Schema, bool, bool]:
        """(schema, whether its types are the read's, has a row) of one file's first block,
        read with the options ``read_file`` uses."""

    # -- what it is and its rows ------------------------------------------------------------
    def fingerprint(self) -> str:
        return fingerprint_files(
            self.files, self.storage_options, by_content=is_local(self.files[0])
        )

    def file_tables(self, columns: tuple[str, ...] | None = None) -> Iterator[tuple[str, pa.Table]]:
        for path in self.files:
            for table in self._tables_of(path, columns):
                yield path, table

    def _tables_of(self, path: str, columns: tuple[str, ...] | None) -> Iterator[pa.Table]:
        fs, inner = storage.url_to_fs(path, self.storage_options)
        try:
            if columns is None:
                yield from self.read_file(fs, inner, path)
            else:
                yield from self.read_columns(fs, inner, path, columns)
        except (MemscoreError, ColumnWidened):
            raise
        except Exception as exc:
            key = _repeated_json_key(exc)
            if key is not None:  # a later line's; the first block's is open_manifest's
                raise MemscoreError(repeated_columns_line(path, [key], json=True)) from None
            raise MemscoreError(
                f"{path}: cannot read the manifest: {first_line(exc)[:300]}"
            ) from None

    @abc.abstractmethod
    def read_file(self, fs, inner: str, path: str) -> Iterator[pa.Table]:
        """One file's rows (``inner`` on ``fs``; ``path`` as the user's form names it)."""

    def read_columns(
        self, fs, inner: str, path: str, columns: tuple[str, ...]
    ) -> Iterator[pa.Table]:
        """One file's rows, of ``columns`` only: its rows read whole, then the columns taken
        (a format that can read some columns alone overrides it)."""
        for table in self.read_file(fs, inner, path):
            yield table.select(list(columns))


def _table_marker(path: str) -> bool:
    """Files that writers of table folders leave beside the data (Spark's ``_SUCCESS``,
    Parquet's ``_metadata``, Hadoop's ``.crc`` files): no rows, no images."""
    name = path.rsplit("/", 1)[-1]
    return name in ("_SUCCESS", "_metadata", "_common_metadata") or (
        name.startswith(".") and name.endswith(".crc")
    )


def _strip(path: str) -> str:
    return path.split("://", 1)[1] if storage.is_url(path) else path


def _repeated_json_key(exc: BaseException) -> str | None:
    """The key that pyarrow's JSON reader found twice in one object, or None."""
    match = _JSON_REPEATED_KEY.search(str(exc))
    return match.group(1) if match else None


# ------------------------------------------------------------------------------------ Parquet
class ParquetTables(TableSource):
    """Parquet (``.parquet``, ``.pq``), read by record batch."""

    kind = "parquet"
    what = "a Parquet table"
    columns_from_first_file = True

    @classmethod
    def peek(cls, fs, path: str) -> tuple[pa.Schema, bool, bool]:
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            return parquet.schema.to_arrow_schema(), True, parquet.metadata.num_rows > 0

    def read_file(self, fs, inner: str, path: str) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        with fs.open(inner, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS):
                yield pa.Table.from_batches([batch])

    def read_columns(
        self, fs, inner: str, path: str, columns: tuple[str, ...]
    ) -> Iterator[pa.Table]:
        """Only ``columns``' chunks are read: a table with an image column (a Hugging Face
        dataset joined on its key by ``memscore evaluate``) is read without its images."""
        import pyarrow.parquet as pq

        with fs.open(inner, "rb") as f:
            reader = pq.ParquetFile(f)
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=list(columns)):
                yield pa.Table.from_batches([batch])


# ---------------------------------------------------------------------------------------- CSV
@dataclass(frozen=True)
class CsvTables(TableSource):
    """CSV (``.csv``, ``.csv.gz``) and TSV (``.tsv``, ``.tsv.gz``), read by pyarrow's block reader.

    Not a pyarrow.dataset scan: it, too, takes a CSV column's type from the first block, and a
    later value that does not convert (150,000 numbers, then "unknown") stops the scan with a
    conversion error; here the column widens and the read restarts.
    """

    kind = "csv"
    what = "a CSV table"
    #: column name -> the wider type a streamed read found it needs (see ``TableSource``)
    widened: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def peek(cls, fs, path: str) -> tuple[pa.Schema, bool, bool]:
        import pyarrow.csv as pacsv

        with fs.open(path, "rb", compression="infer") as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
                parse_options=_csv_options(path).get("parse_options"),
            )
            for batch in reader:
                if batch.num_rows:
                    return reader.schema, True, True
            return reader.schema, True, False

    def read_file(self, fs, inner: str, path: str) -> Iterator[pa.Table]:
        import pyarrow.csv as pacsv

        with fs.open(inner, "rb", compression="infer") as stream:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
                parse_options=_csv_options(path).get("parse_options"),
                convert_options=pacsv.ConvertOptions(column_types=self.widened),
            )
            names = reader.schema.names
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as exc:
                    match = _CSV_CONVERSION.search(str(exc))
                    if not match:
                        raise
                    name = names[int(match.group(1))]
                    wider = pa.binary() if self.widened.get(name) == pa.string() else pa.string()
                    if self.widened.get(name) == wider:
                        raise
                    self.widened[name] = wider
                    raise ColumnWidened(name) from None
                yield pa.Table.from_batches([batch])


def _csv_options(path: str) -> dict:
    if path.lower().endswith((".tsv", ".tsv.gz")):
        import pyarrow.csv as pacsv

        return {"parse_options": pacsv.ParseOptions(delimiter="\t")}
    return {}


# --------------------------------------------------------------------------------- JSON lines
@dataclass(frozen=True)
class JsonLinesTables(TableSource):
    """JSON lines (``.jsonl``, ``.ndjson``, ``.json`` with one object per line, ``.jsonl.gz``,
    ``.ndjson.gz``),
    read by pyarrow's block reader; a file with a column whose values change type is read whole,
    those columns as the values' JSON text (``_read_json_mixed``)."""

    kind = "jsonl"
    what = "a JSON-lines table"
    #: JSON-lines files found to hold a column of mixed types
    widened_json: set = field(default_factory=set, repr=False, compare=False)

    @classmethod
    def peek(cls, fs, path: str) -> tuple[pa.Schema, bool, bool]:
        import pyarrow.json as pajson

        with fs.open(path, "rb", compression="infer") as f:
            try:
                reader = pajson.open_json(
                    f, read_options=pajson.ReadOptions(block_size=_CSV_BLOCK_BYTES)
                )
                return reader.schema, True, True
            except pa.ArrowInvalid as exc:
                if "Empty JSON stream" in str(exc):
                    return pa.schema([]), True, False
                if "changed from" not in str(exc):
                    raise
        # a column of mixed types, read whole later: the names from the first line
        with fs.open(path, "rb", compression="infer") as f:
            first = next(line for line in f if line.strip())
        return pajson.read_json(pa.BufferReader(first)).schema, False, True

    def read_file(self, fs, inner: str, path: str) -> Iterator[pa.Table]:
        with fs.open(inner, "rb", compression="infer") as f:
            if path in self.widened_json:
                # A JSON-lines file with a column whose values change type: read whole, in
                # Python (rare, and the one case not held to bounded memory).
                yield _read_json_mixed(f.read())
                return
            try:
                yield from _jsonl_tables(f)
            except pa.ArrowInvalid as exc:
                if "changed from" not in str(exc):
                    raise
                self.widened_json.add(path)
                raise ColumnWidened(path) from None


def _jsonl_tables(stream) -> Iterator[pa.Table]:
    import pyarrow.json as pajson

    reader = pajson.open_json(stream, read_options=pajson.ReadOptions(block_size=_CSV_BLOCK_BYTES))
    for batch in reader:
        yield pa.Table.from_batches([batch])


def _read_json_mixed(data: bytes) -> pa.Table:
    """JSON lines with a column of mixed types: such columns become the values' JSON text.

    pyarrow's JSON reader, and so ``pyarrow.dataset(format="json")``, refuses such a file
    outright ("changed from int64 to string"); a user's tag column of 1, "x", [1, 2] is data.
    """
    import json

    rows = [json.loads(line) for line in data.splitlines() if line.strip()]
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns: dict[str, Any] = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            columns[name] = pa.array(
                [
                    v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                    for v in values
                ],
                pa.string(),
            )
    return pa.table(columns)
