"""Manifest reader: what the user points memscore at -> a validated ``Manifest`` -> its rows.

``open_manifest`` runs in the driver before any cluster work and before the output is touched:
it finds the files, reads the schema and the first block, and stops with a one-line
``MemscoreError`` on every problem they show (repeated column names, a missing path column or
one that is not text, an empty manifest, a first block that does not parse, a user column that
memscore would overwrite). ``Manifest.iter_tables`` then streams the rows as pyarrow tables,
which ``memscore.sources.snapshot`` copies once into the run's own Parquet parts for Ray Data to read;
``manifest_fingerprint`` names the manifest as it is (a local table by its bytes). User columns
keep their Arrow types end to end.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa

from memscore import storage
from memscore.errors import MemscoreError, first_line

__all__ = ["Manifest", "open_manifest", "ColumnWidened", "read_restarting", "IMAGE_EXTENSIONS",
           "check_reserved_columns", "check_repeated_columns", "check_path_column",
           "manifest_fingerprint", "repeated_values"]

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)
_FORMATS = {
    ".csv": "csv", ".csv.gz": "csv", ".tsv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl",
}


def _format_of(path: str) -> str | None:
    lower = path.lower()
    for suffix, kind in _FORMATS.items():
        if lower.endswith(suffix):
            return kind
    if lower.endswith(IMAGE_EXTENSIONS):
        return "images"
    return None


@dataclass(frozen=True)
class Manifest:
    """A validated manifest.

    Attributes:
        source: what the user gave.
        kind: "csv", "parquet", "jsonl", "images" (a folder or glob of image files) or
            "webdataset" (tar shards; see ``open_manifest``).
        files: the manifest files (for "images" the image files, for "webdataset" the
            shards), full paths or URLs.
        base_dir: folder that relative image paths resolve against.
        columns: the manifest's column names (for "images": just the path column).
        path_column: column holding the image path.
        skipped_files: files of a scanned folder that are not images (not scored; counted).
    """

    source: str
    kind: str
    files: tuple[str, ...]
    base_dir: str
    columns: tuple[str, ...]
    path_column: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    skipped_files: int = 0
    #: column name -> the wider type a streamed read found it needs (see ``iter_tables``)
    widened: dict = field(default_factory=dict, repr=False, compare=False)
    #: JSON-lines files found to hold a column of mixed types
    widened_json: set = field(default_factory=set, repr=False, compare=False)

    def iter_tables(self, limit: int | None = None):
        """The manifest's rows in order, as a stream of pyarrow Tables (the driver reads them).

        Every format is streamed in bounded memory, whatever the manifest's size: Parquet by
        record batch, CSV and JSON lines by pyarrow's block readers. Types are what Arrow infers
        for the whole file, as ``pyarrow.csv.read_csv`` would: a streaming reader infers them
        from the first block, so when a later block does not convert (a word in a column of
        numbers, bytes that are not UTF-8) the column is widened (to text, then to ``binary``;
        nothing is lost) and ``ColumnWidened`` is raised: the caller reads again from the
        start (``read_restarting``). A JSON-lines column whose values change type becomes a
        string column of the values' JSON text. Every file after the first is cast to the
        first file's schema; where it cannot be, the run stops naming the column.
        """
        left = limit
        schema = None
        for path, table in self._tables():
            if schema is None:
                schema = table.schema
            elif table.schema != schema:
                table = _cast_like(table, schema, path)
            if left is not None:
                table = table.slice(0, left)
                left -= table.num_rows
            if table.num_rows:
                yield table
            if left == 0:
                return

    def read_all(self, limit: int | None = None) -> list[pa.Table]:
        """All of ``iter_tables`` at once, for callers that hold the rows anyway (labels,
        ground truth, predictions), read again whenever a column widens."""
        return read_restarting(lambda: list(self.iter_tables(limit)))

    def _tables(self):
        """(file, table) pairs: tables of paths for an image folder, else per manifest file."""
        if self.kind == "images":
            for start in range(0, len(self.files), _BATCH_ROWS):
                paths = pa.array(self.files[start:start + _BATCH_ROWS], pa.string())
                yield self.source, pa.table({self.path_column: paths})
            return
        for path in self.files:
            for table in self._tables_of(path):
                yield path, table

    def _tables_of(self, path: str):
        fs, inner = storage.url_to_fs(path, self.storage_options)
        try:
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                with fs.open(inner, "rb") as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS):
                        yield pa.Table.from_batches([batch])
                return
            with fs.open(inner, "rb", compression="infer") as f:
                if self.kind == "csv":
                    yield from self._csv_tables(f, path)
                elif path in self.widened_json:
                    # A JSON-lines file with a column whose values change type: read whole,
                    # in Python (rare, and the one case not held to bounded memory).
                    yield _read_json_mixed(f.read())
                else:
                    try:
                        yield from _jsonl_tables(f)
                    except pa.ArrowInvalid as exc:
                        if "changed from" not in str(exc):
                            raise
                        self.widened_json.add(path)
                        raise ColumnWidened(path) from None
        except (MemscoreError, ColumnWidened):
            raise
        except Exception as exc:
            key = _repeated_json_key(exc)
            if key is not None:  # a later line's; the first block's is open_manifest's
                raise MemscoreError(_repeated_message(path, [key], json=True)) from None
            raise MemscoreError(f"{path}: cannot read the manifest: {first_line(exc)[:300]}") from None

    def _csv_tables(self, stream, path: str):
        # Not a pyarrow.dataset scan: it, too, takes a CSV column's type from the first block,
        # and a later value that does not convert (150,000 numbers, then "unknown") stops the
        # scan with a conversion error; here the column widens and the read restarts.
        import pyarrow.csv as pacsv

        reader = pacsv.open_csv(
            stream, read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
            parse_options=_csv_options(path).get("parse_options"),
            convert_options=pacsv.ConvertOptions(column_types=self.widened))
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


# Rows per table the driver handles at once, and text bytes per parsed block: both bound the
# driver's memory whatever the manifest's size. pyarrow's own default block, 1 MiB: measured on
# a 10M-row CSV, the streaming reader's peak RSS grows with the block (132 MB at 1 MiB, 271 MB
# at 4 MiB, 713 MB at 16 MiB), not with the file.
_BATCH_ROWS = 65_536
_CSV_BLOCK_BYTES = 1 << 20
_CSV_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error")


class ColumnWidened(Exception):
    """A streamed manifest column met a value its first block's type cannot hold; the
    manifest now reads it as a wider type, from the start (see ``read_restarting``)."""


def read_restarting(work):
    """``work()``, run again each time it meets ``ColumnWidened`` (at most two widenings per
    column: to text, then to binary), so a manifest is read with its whole-file types."""
    while True:
        try:
            return work()
        except ColumnWidened:
            continue


def _jsonl_tables(stream):
    import pyarrow.json as pajson

    reader = pajson.open_json(stream, read_options=pajson.ReadOptions(
        block_size=_CSV_BLOCK_BYTES))
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
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            columns[name] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                 for v in values], pa.string())
    return pa.table(columns)


def _cast_like(table: pa.Table, schema: pa.Schema, path: str) -> pa.Table:
    """``table`` (of a later manifest file) cast to the first file's ``schema``; one line naming
    the file and column where it cannot be.

    Not ``pyarrow.dataset``'s unification: a later file whose image column is named ``file``,
    not ``path``, reads there as rows with a null path (every one an error row), and a type
    that does not cast fails without the file's name; ``pa.unify_schemas`` would add ``file``
    as a third column. The first file's schema is what a streamed read can know without
    opening every file first (CSV and JSON lines have no footer to read a schema from).
    """
    if table.schema.names != schema.names:
        raise MemscoreError(
            f"{path}: columns {table.schema.names} differ from the first manifest file's "
            f"{schema.names}"
        )
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        for expected in schema:
            if table.schema.field(expected.name).type != expected.type:
                raise MemscoreError(
                    f"{path}: column {expected.name!r} is {table.schema.field(expected.name).type} "
                    f"here but {expected.type} in the first manifest file"
                ) from None
        raise


def _csv_options(path: str) -> dict:
    if path.lower().endswith(".tsv"):
        import pyarrow.csv as pacsv

        return {"parse_options": pacsv.ParseOptions(delimiter="\t")}
    return {}


def open_manifest(source: str, *, path_column: str = "path",
                  storage_options: Mapping[str, Any] | None = None,
                  reserved_columns: tuple[str, ...] = (),
                  webdataset: bool = False, image_paths: bool | None = None) -> Manifest:
    """Find and validate the manifest at ``source``; raises ``MemscoreError`` on any problem.

    Args:
        source: a CSV, Parquet (file or folder), JSONL file, a folder of images (searched
            recursively by extension), a glob, or WebDataset shards; a local path or URL.
        path_column: the column holding each image's path (a folder of images gets one).
        storage_options: fsspec options (e.g. S3 endpoint and credentials).
        reserved_columns: names the manifest may not have (the columns a run adds); one is
            refused with one line.
        webdataset: WebDataset shards (``webdataset.is_webdataset``) are a manifest of kind
            "webdataset" whose ``files`` are the shards (``webdataset.expand_shards``); its
            rows are read by ``webdataset.read_shards``, not ``iter_tables``. Without it
            (commands that read a manifest's rows in the driver) shards are refused with one
            line.
        image_paths: whether the path column names images to read, and so must be text;
            by default, when ``reserved_columns`` is given (the commands that score or train
            on the images do). A table read for its values (ground truth joined on an id,
            a manifest to verify against) may key it by any column.

    Everything the schema and the first block show is checked here, before any output is
    written: repeated column names (``check_repeated_columns``), no rows, no path column, a
    column memscore would overwrite, a path column that is not text (``check_path_column``),
    a first block that does not parse. What only the whole manifest shows (a later block
    that does not parse or cast, ``--id-column`` uniqueness) is found by
    ``snapshot.write_snapshot``, which then leaves nothing behind.

    Example:
        >>> images = open_manifest("examples/images")
        >>> images.kind, len(images.files), images.columns
        ('images', 5, ('path',))
        >>> with open("labels.csv", "w") as f:
        ...     _ = f.write("file,hr\\nexamples/images/rocket.jpg,0.8\\n")
        >>> open_manifest("labels.csv", path_column="file").columns
        ('file', 'hr')
        >>> open_manifest("labels.csv")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        memscore.errors.MemscoreError: labels.csv: no column 'path' (columns: file, hr); ...
    """
    options = dict(storage_options or {})
    from memscore.sources import webdataset as wds

    if wds.is_webdataset(source, options):
        if not webdataset:
            raise MemscoreError(f"{source}: WebDataset shards can be scored (memscore score), "
                                f"not read here; give a table manifest or a folder of images")
        shards = wds.expand_shards(source, options)
        base = storage.absolute(source).split("{")[0].rstrip("/")
        return Manifest(source, "webdataset", tuple(shards), base, (wds.KEY, wds.URL), wds.KEY,
                        options)
    try:
        fs, root = storage.url_to_fs(source, options)
    except Exception as exc:
        raise MemscoreError(f"cannot open {source}: {first_line(exc)}") from None
    try:
        kind, files, base_dir, skipped = _find_files(source, fs, root)
    except MemscoreError:
        raise
    except Exception as exc:  # the listing itself failed (an endpoint down, access denied)
        raise MemscoreError(f"cannot list {source}: {type(exc).__name__}: "
                            f"{first_line(exc)[:300]}") from None
    if kind == "images":
        if not files:
            raise MemscoreError(f"{source}: no image files found (looked for "
                                f"{', '.join(IMAGE_EXTENSIONS)}; {skipped} other files)")
        return Manifest(source, kind, tuple(files), base_dir, (path_column,), path_column,
                        options, skipped_files=skipped)
    file, schema, typed, has_rows = _first_block(kind, files, fs, source)
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
    return Manifest(source, kind, tuple(files), base_dir, tuple(columns), path_column, options)


def check_reserved_columns(columns, reserved, source: str) -> None:
    """Refuse a manifest column that memscore's output would overwrite.

    The bookkeeping columns all start with ``memscore_``; a clash with a score column (a
    ground-truth ``memorability``) is resolved with ``--column-prefix``.
    """
    if not reserved:  # read, not scored (ground truth, a manifest to verify against)
        return
    clash = [c for c in columns if c in reserved or c.startswith(("__memscore", "memscore_"))]
    if clash:
        raise MemscoreError(
            f"{source}: column {', '.join(repr(c) for c in clash)} would be overwritten by "
            f"memscore's output (it adds {', '.join(reserved)}); give --column-prefix pred_ "
            f"to name the score columns pred_..., or rename the column in the manifest"
        )


def _full(source: str, fs, path: str) -> str:
    """A path from ``fs`` back in the user's form (with the scheme for URLs)."""
    if storage.is_url(source):
        return f"{source.split('://', 1)[0]}://{path}"
    return path


def _find_files(source: str, fs, root: str) -> tuple[str, list[str], str, int]:
    """(kind, files, base folder, non-image files skipped) for what the user named.

    Not ``pyarrow.dataset``'s discovery: given a folder it reads every file as the one format
    it is told (a photo folder with a ``captions.csv`` fails on the first JPEG as CSV), where
    memscore decides between images and tables from the names; and it skips every name
    starting with ``_`` or ``.`` (a camera's ``_DSC0001.JPG``, a user's ``_part.parquet``),
    or with ``ignore_prefixes=[]`` none (it then fails reading a Hadoop ``.crc`` file as
    Parquet), where memscore leaves out only its own ``_memscore*`` entries and the table
    writers' markers. The listing itself is fsspec's (``find``, ``glob``), in sorted order.
    """
    if globlib.has_magic(root):
        matches = sorted(p for p in fs.glob(root) if fs.isfile(p))
        if not matches:
            raise MemscoreError(f"{source}: the pattern matches no file")
        kinds = {_format_of(p) for p in matches}
        if len(kinds) != 1 or None in kinds:
            raise MemscoreError(
                f"{source}: the pattern matches files of mixed or unknown kinds "
                f"(e.g. {matches[0]}); match only images or only one manifest format"
            )
        base = _full(source, fs, root.split("*")[0].rsplit("/", 1)[0] or "/")
        return kinds.pop(), [_full(source, fs, p) for p in matches], base, 0
    if not fs.exists(root):
        raise MemscoreError(f"{source}: no such file or folder")
    if fs.isdir(root):
        found = sorted(p for p in fs.find(root) if not _memscores_own(p, root))
        tables = [p for p in found if not _table_marker(p)]
        kinds = {_format_of(p) for p in tables}
        if tables and len(kinds) == 1 and kinds <= {"parquet", "csv", "jsonl"}:
            # a folder of nothing but table files of one format is a table manifest
            return kinds.pop(), [_full(source, fs, p) for p in tables], _full(source, fs, root), 0
        images = [p for p in found if _format_of(p) == "images"]
        return ("images", [_full(source, fs, p) for p in images], _full(source, fs, root),
                len(found) - len(images))
    kind = _format_of(root)
    if kind is None or kind == "images":
        raise MemscoreError(
            f"{source}: not a manifest (expected .csv, .tsv, .parquet, .jsonl or .json lines, "
            f"or a folder)"
        )
    return kind, [_full(source, fs, root)], storage.parent(_full(source, fs, root)), 0


def _memscores_own(path: str, root: str) -> bool:
    """memscore's own entries (``_memscore.json``, ``_memscore/``, an output's parts) in a
    scanned folder: the only files a folder scan leaves out unseen."""
    rel = os.path.relpath(path, root)
    return any(part.startswith("_memscore") for part in rel.split(os.sep))


def _table_marker(path: str) -> bool:
    """Files that writers of table folders leave beside the data (Spark's ``_SUCCESS``,
    Parquet's ``_metadata``, Hadoop's ``.crc`` files): no rows, no images."""
    name = path.rsplit("/", 1)[-1]
    return name in ("_SUCCESS", "_metadata", "_common_metadata") or (
        name.startswith(".") and name.endswith(".crc"))


def _first_block(kind: str, files: list[str], fs, source: str
                 ) -> tuple[str, pa.Schema, bool, bool]:
    """What a streamed read of the manifest starts with: (the file whose columns it takes,
    its schema, whether that schema's types are the ones the read will give, whether the
    manifest has a row).

    The types are those of the first block, read as ``Manifest.iter_tables`` reads it (a
    Parquet file's own schema; a CSV or JSON-lines file's first block, inferred), so what
    the snapshot's first block would show is seen here, before the output is touched. A
    JSON-lines block whose values change type is read whole later, as text
    (``_read_json_mixed``): its types are then not known here.
    """
    import pyarrow.parquet as pq

    file = files[0]
    try:
        if kind == "parquet":
            with fs.open(_strip(file), "rb") as f:
                schema = pq.read_schema(f)
            for path in files:  # stop at the first file with a row: only emptiness matters
                with fs.open(_strip(path), "rb") as f:
                    if pq.ParquetFile(f).metadata.num_rows:
                        return file, schema, True, True
            return file, schema, True, False
        for file in files:  # the first file with a row gives the columns, as in iter_tables
            schema, typed, has_rows = _peek_text(kind, fs, _strip(file))
            if has_rows:
                return file, schema, typed, True
        return file, schema, typed, False
    except MemscoreError:
        raise
    except Exception as exc:
        key = _repeated_json_key(exc)
        if key is not None:
            raise MemscoreError(_repeated_message(file, [key], json=True)) from None
        raise MemscoreError(f"{source}: cannot read the manifest: {first_line(exc)}") from None


def _strip(path: str) -> str:
    return path.split("://", 1)[1] if storage.is_url(path) else path


def _peek_text(kind: str, fs, path: str) -> tuple[pa.Schema, bool, bool]:
    """(schema, whether its types are the read's, has a row) of a CSV or JSON-lines file's
    first block, read with the options ``Manifest.iter_tables`` uses."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    with fs.open(path, "rb", compression="infer") as f:
        if kind == "csv":
            reader = pacsv.open_csv(
                f, read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
                parse_options=_csv_options(path).get("parse_options"))
            for batch in reader:
                if batch.num_rows:
                    return reader.schema, True, True
            return reader.schema, True, False
        try:
            reader = pajson.open_json(f, read_options=pajson.ReadOptions(
                block_size=_CSV_BLOCK_BYTES))
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


def _repeated_message(file: str, names: list[str], *, json: bool = False) -> str:
    which = ", ".join(repr(n) for n in names)
    where = "is repeated in a JSON line" if json else (
        "is repeated" if len(names) == 1 else "are repeated")
    return (f"{file}: column name{'s' if len(names) > 1 else ''} {which} {where}; give each "
            f"column its own name")


_JSON_REPEATED_KEY = re.compile(r"Column\(/(.*)\) was specified twice")


def _repeated_json_key(exc: BaseException) -> str | None:
    """The key that pyarrow's JSON reader found twice in one object, or None."""
    match = _JSON_REPEATED_KEY.search(str(exc))
    return match.group(1) if match else None


def check_repeated_columns(names, file: str) -> None:
    """Refuse a table with two columns of one name (a CSV header ``path,x,x``, a Parquet file
    written with repeated names): Arrow reads such a file, but no Parquet reader, join or
    column lookup after it can tell the two apart.

    Example:
        >>> check_repeated_columns(["path", "x", "x"], "m.csv")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        memscore.errors.MemscoreError: m.csv: column name 'x' is repeated; give each column ...
    """
    from collections import Counter

    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise MemscoreError(_repeated_message(file, repeated))


def check_path_column(schema: pa.Schema, path_column: str, source: str) -> None:
    """Refuse a path column that is not text: a number column named by mistake, bytes that
    are not UTF-8, or a column with no value at all in the rows the type was inferred from.

    Example:
        >>> check_path_column(pa.schema({"path": pa.int64()}), "path", "m.parquet")
        Traceback (most recent call last):
        memscore.errors.MemscoreError: m.parquet: the path column 'path' is of type int64, not text
    """
    kind = schema.field(path_column).type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        detail = "holds bytes that are not UTF-8 text"
    elif pa.types.is_null(kind):
        detail = "has no values in the manifest's first rows"
    else:
        detail = f"is of type {kind}, not text"
    raise MemscoreError(f"{source}: the path column {path_column!r} {detail}")


def manifest_fingerprint(manifest: Manifest) -> str:
    """A sha256 hex digest that names the manifest as it is now: a run records it, and
    ``--resume`` and ``memscore verify`` compare it with the manifest they are given.

    What it covers, by kind:

    - a local table manifest (CSV, TSV, Parquet, JSON lines; a file or a folder of them):
      each file's path and the sha256 of its bytes. An edit in place is seen even when it
      keeps the size and puts the modification time back (``os.utime``, a copy with
      ``cp -p``, a restore from a backup).
    - table files on an object store (S3): each object's path, size and ETag, the content
      hash the store keeps, read with one HEAD per object (32 at a time) instead of the
      bytes. (A multipart upload's ETag is not the MD5 of the whole object, but it changes
      with the bytes.)
    - WebDataset shards, local or on S3: each shard's path, size and modification time (ETag
      on S3), as before. Hashing the shards would read the whole data set (terabytes)
      before every run and every resume, which is not affordable; an edit in place that
      keeps a shard's size and time is not seen.
    - a scanned folder of images: the image paths, in order (the folder's rows).

    Cost: ``--resume`` recomputes it before it compares (``resume.run_identity``), and so
    does a fresh run, before its snapshot. For a local table manifest that is one read of
    its files. Measured on a 1.0 GB CSV (10.4 million rows) on a 2-core AMD EPYC VM (sha256
    in hardware, about 1.3 GB/s): 0.7 s from the page cache, 1.2 s with the file's pages
    dropped from it (this VM's disk reads at about 3 GB/s; a disk reading 200 MB/s would
    make it the read's 5 s). The snapshot of the same file took 8 s; the size-and-mtime
    stamp that the hash replaces took 15 microseconds a file.

    Example:
        >>> with open("m.csv", "w") as f:
        ...     _ = f.write("path\\nexamples/images/rocket.jpg\\n")
        >>> before = manifest_fingerprint(open_manifest("m.csv"))
        >>> stat = os.stat("m.csv")
        >>> with open("m.csv", "r+") as f:
        ...     _ = f.write("PATH")  # same size
        >>> os.utime("m.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns))
        >>> manifest_fingerprint(open_manifest("m.csv", path_column="PATH")) == before
        False
    """
    digest = hashlib.sha256()
    if manifest.kind == "images":
        for path in manifest.files:
            digest.update(path.encode() + b"\0")
        return digest.hexdigest()
    by_content = manifest.kind != "webdataset" and _is_local(manifest.files[0])

    def stamp(path: str) -> str:
        fs, inner = storage.url_to_fs(path, manifest.storage_options)
        if by_content:
            return f"{path}\0sha256:{_file_sha256(inner)}\0"
        info = fs.info(inner)
        when = info.get("ETag") or info.get("mtime") or info.get("LastModified")
        return f"{path}\0{info.get('size')}\0{when}\0"

    # Local files: hashed side by side (hashlib lets go of the GIL), one per core. Thousands
    # of objects on S3: a HEAD each, many at a time rather than one after another.
    workers = (os.cpu_count() or 1) if by_content else 32
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for text in pool.map(stamp, manifest.files):
            digest.update(text.encode())
    return digest.hexdigest()


def _is_local(path: str) -> bool:
    return not storage.is_url(path) or path.startswith("file://")


# Bytes per read when hashing: 1 and 4 MiB hashed a 1 GB file equally fast (0.8 s warm).
_HASH_CHUNK = 1 << 20


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def repeated_values(values) -> tuple[int, Any, int] | None:
    """How many distinct values of a key column occur more than once, one of them, and how
    often it occurs; None when every value is unique (nulls are the caller's to count).

    Example:
        >>> repeated_values(pa.array(["a.jpg", "b.jpg", "a.jpg"]))
        (1, 'a.jpg', 2)
    """
    import pyarrow.compute as pc

    counts = pc.value_counts(values)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return None
    example = repeated[0].as_py()
    return len(repeated), example["values"], example["counts"]
