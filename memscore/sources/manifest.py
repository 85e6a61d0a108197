"""What the user points memscore at -> a validated ``Source`` of the kind that recognises it.

``open_manifest`` runs in the driver before any cluster work and before the output is touched:
it asks each kind of ``KINDS`` in turn whether the location is theirs, and the first that says
yes opens it, stopping with a one-line ``MemscoreError`` on every problem its files, schema and
first block show. What a command does next it asks the ``Source`` (``base.py``): its rows as
tables (``iter_tables``), its fingerprint, how a run freezes and reads it, how its rows are
counted. A new kind is a module with a ``Source`` class and one line in ``KINDS``.

``Manifest`` is ``Source``'s older name; the column checks, ``read_restarting`` and
``IMAGE_EXTENSIONS`` are importable from here as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memscore.errors import MemscoreError
from memscore.sources.arrow import ArrowTables
from memscore.sources.base import ColumnWidened, Location, Source, read_restarting
from memscore.sources.checks import (
    check_path_column,
    check_repeated_columns,
    check_reserved_columns,
    repeated_values,
)
from memscore.sources.formats import IMAGE_EXTENSIONS
from memscore.sources.images import ImageFolder
from memscore.sources.parquet_images import ParquetImages
from memscore.sources.tables import CsvTables, JsonLinesTables, ParquetTables
from memscore.sources.webdataset import WebDatasetShards

__all__ = [
    "KINDS",
    "Source",
    "Manifest",
    "open_manifest",
    "ColumnWidened",
    "read_restarting",
    "IMAGE_EXTENSIONS",
    "check_reserved_columns",
    "check_repeated_columns",
    "check_path_column",
    "manifest_fingerprint",
    "repeated_values",
]

#: Every kind of source, in the order each is asked whether a location is theirs: shards first
#: (a folder of shards beside img2dataset's .parquet files is shards, not a table), Parquet
#: whose images are in a column (no path column, one image column; before the plain tables),
#: the table formats (a folder of nothing but table files of one format), and last a folder or
#: glob of images, which takes any folder the others did not.
KINDS: tuple[type[Source], ...] = (
    WebDatasetShards,
    ParquetImages,
    ParquetTables,
    CsvTables,
    JsonLinesTables,
    ArrowTables,
    ImageFolder,
)

#: ``Source``'s older name, for code written before the kinds were classes of their own.
Manifest = Source


def open_manifest(
    source: str,
    *,
    path_column: str = "path",
    storage_options: Mapping[str, Any] | None = None,
    reserved_columns: tuple[str, ...] = (),
    rows_in_driver: bool = True,
    image_paths: bool | None = None,
    webdataset: bool | None = None,
    image_column: str | None = None,
    keep_image_column: bool = False,
) -> Source:
    """Find and validate the manifest at ``source``; raises ``MemscoreError`` on any problem.

    Args:
        source: a CSV, Parquet (file or folder), JSONL file, a folder of images (searched
            recursively by extension), a glob, or WebDataset shards; a local path or URL.
        path_column: the column holding each image's path (a folder of images gets one).
        storage_options: fsspec options (e.g. S3 endpoint and credentials).
        reserved_columns: names the manifest may not have (the columns a run adds); one is
            refused with one line.
        rows_in_driver: the caller reads the rows in this process (``iter_tables``,
            ``read_all``), so a kind whose rows cannot be read there (WebDataset shards, read
            by Ray tasks) is refused with one line. False: the caller asks the ``Source`` how
            to read and count its rows (``memscore score``, ``memscore verify``).
        image_paths: whether the path column names images to read, and so must be text;
            by default, when ``reserved_columns`` is given (the commands that score or train
            on the images do). A table read for its values (ground truth joined on an id,
            a manifest to verify against) may key it by any column.
        webdataset: the older spelling of ``rows_in_driver=not webdataset``.
        image_column: the column holding each row's image bytes, in a Parquet table whose
            images are inside it (``parquet_images.ParquetImages``; by default the one such
            column of a table without ``path_column``). Refused for other sources.
        keep_image_column: such a table's image column is kept in the rows (and so in a run's
            output); by default it is left out.

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
    if webdataset is not None:
        rows_in_driver = not webdataset
    location = Location(
        source,
        storage_options,
        path_column=path_column,
        image_column=image_column,
        keep_image_column=keep_image_column,
    )
    for kind in KINDS:
        if kind.recognises(location):
            if (image_column or keep_image_column) and kind is not ParquetImages:
                option = "--image-column" if image_column else "--keep-image-column"
                raise MemscoreError(
                    f"{source}: {option} is for Parquet whose images are in a column, "
                    f"not {kind.what}"
                )
            if rows_in_driver:
                kind.check_readable_in_driver(source)
            return kind.open(
                location,
                path_column=path_column,
                reserved_columns=tuple(reserved_columns),
                image_paths=image_paths,
            )
    raise MemscoreError(_recognised_by_none(location))


def _recognised_by_none(location: Location) -> str:
    listing = location.listing()
    if listing.shape == "pattern":
        return (
            f"{location.given}: the pattern matches files of mixed or unknown kinds "
            f"(e.g. {listing.paths[0]}); match only images or only one manifest format"
        )
    return (
        f"{location.given}: not a manifest (expected .csv, .tsv, .parquet, .jsonl or .json "
        f"lines, or a folder)"
    )


def manifest_fingerprint(manifest: Source) -> str:
    """A sha256 hex digest that names the manifest as it is now: a run records it, and
    ``--resume`` and ``memscore verify`` compare it with the manifest they are given.

    What it covers is each kind's ``Source.fingerprint``: a local table manifest's file paths
    and the sha256 of their bytes, table files on an object store by their ETags, WebDataset
    shards by path, size and modification time (hashing terabytes before every run is not
    affordable), a scanned folder of images by its image paths, in order. ``--resume``
    recomputes it before it compares (``run_identity``), and so does a fresh run, before its
    snapshot.

    Example:
        >>> import os
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
    return manifest.fingerprint()
