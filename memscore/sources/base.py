"""What every kind of source answers: the ``Source`` interface, and what the kinds share.

A *source* is what the user points a command at (a CSV, a folder of images, WebDataset
shards ...), found and validated. Each kind is one small class in a module of its own
(``tables.py``, ``images.py``, ``webdataset.py``) behind ``Source``, registered in
``manifest.KINDS``; code outside ``memscore.sources`` asks the interface, never which kind it
holds. A new kind is a new module that implements ``Source`` and one line in ``KINDS``
(``tests/test_sources.py`` then runs it through the interface).

Also here: ``Location`` (what the user named, listed once for every kind that is asked),
``Snapshot`` (the rows a run reads), ``RowsRead`` (what a finished run read),
``ColumnWidened``/``read_restarting`` (a streamed read that restarts with a wider type) and
``fingerprint_files``.
"""

from __future__ import annotations

import abc
import glob as globlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from memscore import storage
from memscore.errors import MemscoreError, first_line

__all__ = [
    "Source",
    "Location",
    "Listing",
    "Snapshot",
    "RowsRead",
    "ColumnWidened",
    "read_restarting",
    "fingerprint_files",
    "is_local",
    "local_path",
    "BATCH_ROWS",
]

# Rows per table the driver handles at once: it bounds the driver's memory whatever the
# manifest's size.
BATCH_ROWS = 65_536


@dataclass(frozen=True)
class Snapshot:
    """The rows a run scores: parts of the manifest copied into ``_memscore/manifest/``, or for
    WebDataset the shards themselves (``rows`` None: known once every shard is read)."""

    files: tuple[str, ...]
    rows: int | None


@dataclass(frozen=True)
class RowsRead:
    """What a finished run read from its source (``Source.rows_read``).

    Attributes:
        rows: how many rows.
        expected_ids: what the output's final count checks each ``memscore_row`` against:
            a row count N (ids ``0 .. N-1``), or each part's row count (shard ``i``'s ids are
            ``i << 32 | 0 .. n_i - 1``).
        summary: entries the run summary records for this source (the shards' sample counts
            that ``memscore verify`` checks an output against); empty for most kinds.
    """

    rows: int
    expected_ids: int | list[int]
    summary: dict[str, Any] = field(default_factory=dict)


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


# ------------------------------------------------------------------------------- the location
@dataclass(frozen=True)
class Listing:
    """The files at a location, as its filesystem names them (no scheme), sorted.

    Attributes:
        shape: "pattern" (a glob: its matching files), "folder" (its files at any depth,
            memscore's own ``_memscore*`` entries left out) or "file" (that file).
        paths: the files.
        base_dir: the folder relative image paths resolve against, in the user's form.
    """

    shape: str
    paths: tuple[str, ...]
    base_dir: str


class Location:
    """What the user named, as each kind is asked whether it is theirs: the text as given,
    its filesystem (``filesystem``) and the files there (``listing``), both found on the first
    ask and then kept, so that asking every kind costs one listing; and how the user said the
    rows' images are found (``path_column``; ``image_column`` and ``keep_image_column``, for a
    table that holds its images' bytes in a column).

    Not ``pyarrow.dataset``'s discovery: given a folder it reads every file as the one format
    it is told (a photo folder with a ``captions.csv`` fails on the first JPEG as CSV), where
    memscore's kinds decide from the names; and it skips every name starting with ``_`` or
    ``.`` (a camera's ``_DSC0001.JPG``, a user's ``_part.parquet``), or with
    ``ignore_prefixes=[]`` none (it then fails reading a Hadoop ``.crc`` file as Parquet),
    where memscore leaves out only its own ``_memscore*`` entries here and the table writers'
    markers in ``tables.py``. The listing itself is fsspec's (``find``, ``glob``).
    """

    def __init__(
        self,
        given: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        path_column: str = "path",
        image_column: str | None = None,
        keep_image_column: bool = False,
    ):
        self.given = given
        self.storage_options = dict(storage_options or {})
        # how the user said each row's image is found: a kind may recognise a location by
        # them (a Parquet table without the path column whose image bytes are in a column)
        self.path_column = path_column
        self.image_column = image_column
        self.keep_image_column = keep_image_column
        self._filesystem: tuple[Any, str] | None = None
        self._listing: Listing | None = None

    def filesystem(self) -> tuple[Any, str]:
        """(fsspec filesystem, the path inside it); one line when it cannot be opened."""
        if self._filesystem is None:
            try:
                self._filesystem = storage.url_to_fs(self.given, self.storage_options)
            except Exception as exc:
                raise MemscoreError(f"cannot open {self.given}: {first_line(exc)}") from None
        return self._filesystem

    def full(self, path: str) -> str:
        """A path from the filesystem back in the user's form (with the scheme for URLs)."""
        if storage.is_url(self.given):
            return f"{self.given.split('://', 1)[0]}://{path}"
        return path

    def listing(self) -> Listing:
        """The files there; one line when nothing is there, a pattern matches no file, or
        the listing itself fails (an endpoint down, access denied)."""
        if self._listing is None:
            fs, root = self.filesystem()
            try:
                self._listing = self._list(fs, root)
            except MemscoreError:
                raise
            except Exception as exc:
                raise MemscoreError(
                    f"cannot list {self.given}: {type(exc).__name__}: {first_line(exc)[:300]}"
                ) from None
        return self._listing

    def _list(self, fs, root: str) -> Listing:
        if globlib.has_magic(root):
            matches = sorted(p for p in fs.glob(root) if fs.isfile(p))
            if not matches:
                raise MemscoreError(f"{self.given}: the pattern matches no file")
            base = self.full(root.split("*")[0].rsplit("/", 1)[0] or "/")
            return Listing("pattern", tuple(matches), base)
        if not fs.exists(root):
            raise MemscoreError(f"{self.given}: no such file or folder")
        if fs.isdir(root):
            found = sorted(p for p in fs.find(root) if not _memscores_own(p, root))
            return Listing("folder", tuple(found), self.full(root))
        return Listing("file", (root,), storage.parent(self.full(root)))


def _memscores_own(path: str, root: str) -> bool:
    """memscore's own entries (``_memscore.json``, ``_memscore/``, an output's parts) in a
    scanned folder: the only files a folder scan leaves out unseen."""
    rel = os.path.relpath(path, root)
    return any(part.startswith("_memscore") for part in rel.split(os.sep))


# --------------------------------------------------------------------------------- the interface
@dataclass(frozen=True)
class Source(abc.ABC):
    """A validated source of rows: what every kind answers.

    Attributes:
        source: what the user gave.
        files: the files behind it (table files, image files, shards), full paths or URLs.
        base_dir: the folder that relative image paths resolve against.
        columns: the column names its rows have (a folder of images: just the path column).
        path_column: the column naming each row's image.
        storage_options: fsspec options; a run's own folders (its snapshot, its counts) are
            on the same storage options.
        skipped_files: files of a scanned folder that are not images (not scored; counted).

    Class attributes, per kind:
        kind: its name (``formats.SUFFIX_KINDS`` names the files of each).
        what: a few words for messages ("a folder of images").
        is_table: its rows are a table's, with the user's columns and values (labels,
            predictions), not rows made up from files.
        row_ids_are_positions: a row's ``memscore_row`` is its position ``0 .. N-1`` in the
            rows ``iter_tables`` gives, which the run's snapshot copies; False where the kind
            numbers its rows itself (shards: ``shard << 32 | sample``).
        images_in_place: the rows the driver reads (``iter_tables``) do not say where their
            images are: the kind's own Ray tasks read them where they lie, with their bytes
            (``dataset_of_rows``); False where a row names its image in ``path_column``.
    """

    source: str
    files: tuple[str, ...]
    base_dir: str
    columns: tuple[str, ...]
    path_column: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    skipped_files: int = 0

    kind: ClassVar[str]
    what: ClassVar[str]
    is_table: ClassVar[bool] = False
    row_ids_are_positions: ClassVar[bool] = True
    images_in_place: ClassVar[bool] = False

    # -- found and opened ---------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def recognises(cls, location: Location) -> bool:
        """Whether what the user named is this kind. Asked in ``manifest.KINDS``' order, so
        a kind need not rule out those asked before it."""

    @classmethod
    @abc.abstractmethod
    def open(
        cls,
        location: Location,
        *,
        path_column: str,
        reserved_columns: tuple[str, ...],
        image_paths: bool | None,
    ) -> Source:
        """Find and validate the source (see ``manifest.open_manifest`` for the arguments);
        every problem its schema and first block show is one ``MemscoreError`` line."""

    @classmethod
    def check_readable_in_driver(cls, given: str) -> None:
        """Refuse (one line) where this kind's rows cannot be read in the driver
        (``iter_tables``): a command that reads them there (``finetune``, ``evaluate``) asks
        before opening. Every kind's rows can be, unless it says otherwise."""
        return None

    # -- what it is -------------------------------------------------------------------------
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A sha256 hex digest naming the source as it is now: a run records it, and
        ``--resume`` and ``memscore verify`` compare it (``manifest.manifest_fingerprint``)."""

    # -- read in the driver -----------------------------------------------------------------
    @abc.abstractmethod
    def file_tables(self, columns: tuple[str, ...] | None = None) -> Iterator[tuple[str, pa.Table]]:
        """(file, table) pairs in row order, as each file holds its rows, of ``columns`` only
        where given (a Parquet file reads no other); ``iter_tables`` casts and cuts them."""

    def iter_tables(
        self, limit: int | None = None, columns: tuple[str, ...] | None = None
    ) -> Iterator[pa.Table]:
        """The rows in order, as a stream of pyarrow Tables (the driver reads them), the first
        ``limit`` only, ``columns`` only where given (by default every column the driver reads:
        ``columns_in_driver``). Every file after the first is cast to the first file's schema;
        where it cannot be, one line names the file and column. A kind's streamed read may
        raise ``ColumnWidened`` (read again from the start: ``read_restarting``, ``read_all``)."""
        left = limit
        schema = None
        for path, table in self.file_tables(columns):
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

    def read_all(
        self, limit: int | None = None, columns: tuple[str, ...] | None = None
    ) -> list[pa.Table]:
        """All of ``iter_tables`` at once, for callers that hold the rows anyway (labels,
        ground truth, predictions), read again whenever a column widens."""
        return read_restarting(lambda: list(self.iter_tables(limit, columns)))

    @property
    def columns_in_driver(self) -> tuple[str, ...]:
        """The columns of the rows ``iter_tables`` gives: all of ``columns``, but for a kind
        whose images' bytes are in a column, which the driver never reads."""
        return self.columns

    def row_ids(self, rows: int) -> pa.Array:
        """The ``memscore_row`` (int64) of each of the first ``rows`` rows ``iter_tables``
        gives, in order: their positions, unless the kind numbers its rows itself."""
        return pa.array(range(rows), pa.int64())

    def dataset_of_rows(self, row_ids: pa.Array):
        """The rows whose ``memscore_row`` is in ``row_ids`` (int64, ascending) as a Ray
        Dataset for the decode stage, read where they lie by the kind's own Ray tasks, each
        with ``memscore_row`` and its image as ``image_reading`` says (a training job's split,
        whose labels the driver holds). Only for ``images_in_place`` kinds: the others' rows
        name their images in ``path_column``, which a job writes to files of its own."""
        raise MemscoreError(f"{self.source}: {self.what}: rows are read by their image paths")

    # -- a scoring run ------------------------------------------------------------------------
    @abc.abstractmethod
    def check_run_options(self, *, limit: int | None, id_column: str | None) -> None:
        """Refuse (one line) ``--limit`` or ``--id-column`` where this kind cannot take them."""

    @abc.abstractmethod
    def freeze(
        self, folder: str, *, limit: int | None, rows_per_file: int, id_column: str | None
    ) -> Snapshot:
        """Fix the rows a run scores, so that a resumed run reads the same ones: copied into
        ``folder`` (the run's snapshot), or named where they are."""

    @abc.abstractmethod
    def dataset(self, snapshot: Snapshot, *, reserved_columns: tuple[str, ...], counts_folder: str):
        """The snapshot's rows as a Ray Dataset for the decode stage. ``reserved_columns``:
        the columns the run adds (no row may bring one); ``counts_folder``: where read tasks
        record what each part held, for kinds whose row count is known only once read."""

    @abc.abstractmethod
    def image_reading(self) -> dict[str, Any]:
        """How the decode stage gets a row's image: ``DecodeImages``' ``path_column``,
        ``bytes_column`` (the row carries its image's bytes) and ``confine_to`` (a local
        folder no path may lead out of)."""

    @abc.abstractmethod
    def rows_read(self, snapshot: Snapshot, counts_folder: str, *, output: str) -> RowsRead:
        """What the finished run read (``RowsRead``); one line naming ``output`` where that
        cannot be known."""

    @abc.abstractmethod
    def recorded_rows(
        self, output: str, *, summary: Mapping[str, Any] | None, counts_folder: str, by_name: bool
    ) -> list[int] | None:
        """For ``memscore verify``: each part's row count as the run recorded it (its
        ``summary``, or ``counts_folder`` for a run not finished), checked to be the parts this
        source names (``by_name``: by file name); None where row ids are positions, counted
        from the source itself."""

    @abc.abstractmethod
    def first_local_files(self, count: int, *, rows: int) -> list[str]:
        """Up to ``count`` local files among the first ``rows`` rows' inputs that this process
        can read: what a run on several nodes checks every node sees (``cluster_check``)."""


def _cast_like(table: pa.Table, schema: pa.Schema, path: str) -> pa.Table:
    """``table`` (of a later file) cast to the first file's ``schema``; one line naming the file
    and column where it cannot be.

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


# ------------------------------------------------------------------------------ fingerprints
# Bytes per read when hashing: 1 and 4 MiB hashed a 1 GB file equally fast (0.8 s warm).
_HASH_CHUNK = 1 << 20


def fingerprint_files(files, storage_options: Mapping[str, Any] | None, *, by_content: bool) -> str:
    """A sha256 hex digest over ``files`` in order: each local file's path and the sha256 of its
    bytes (``by_content``), else each file's path, size and ETag (modification time where the
    store keeps no ETag), read with one HEAD per object, 32 at a time.

    Local files are hashed side by side (hashlib lets go of the GIL), one per core.
    """
    digest = hashlib.sha256()

    def stamp(path: str) -> str:
        fs, inner = storage.url_to_fs(path, storage_options)
        if by_content:
            return f"{path}\0sha256:{_file_sha256(inner)}\0"
        info = fs.info(inner)
        when = info.get("ETag") or info.get("mtime") or info.get("LastModified")
        return f"{path}\0{info.get('size')}\0{when}\0"

    workers = (os.cpu_count() or 1) if by_content else 32
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for text in pool.map(stamp, files):
            digest.update(text.encode())
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def is_local(path: str) -> bool:
    """Whether ``path`` is on this machine's disk (a plain path or ``file://``)."""
    return not storage.is_url(path) or path.startswith("file://")


def local_path(path: str) -> str | None:
    """The local path ``path`` names, or None for a URL of another filesystem."""
    if not storage.is_url(path):
        return path
    if path.startswith("file://"):
        return path[len("file://") :]
    return None
