"""A folder of images (searched at any depth) or a glob of image files: one row per image.

The rows are the image paths, in sorted order, in one column named ``--path-column``; the
folder's other files are counted (``skipped_files``), not scored. The folder is all a run may
read: a symlink leading out of it is that row's error (``image_reading``'s ``confine_to``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from memscore import storage
from memscore.errors import MemscoreError
from memscore.sources.base import BATCH_ROWS, Location
from memscore.sources.formats import IMAGE_EXTENSIONS, kind_of
from memscore.sources.snapshot import SnapshotSource

__all__ = ["ImageFolder"]


class ImageFolder(SnapshotSource):
    """A folder or glob of image files (``formats.IMAGE_EXTENSIONS``).

    Asked last (``manifest.KINDS``): any folder the kinds before it did not take is a folder
    of images, whatever else it holds; only memscore's own ``_memscore*`` entries are left out
    unseen. A single image file is not a manifest.
    """

    kind = "images"
    what = "a folder of images"

    @classmethod
    def recognises(cls, location: Location) -> bool:
        listing = location.listing()
        if listing.shape == "pattern":
            return all(kind_of(p) == cls.kind for p in listing.paths)
        return listing.shape == "folder"

    @classmethod
    def open(
        cls,
        location: Location,
        *,
        path_column: str,
        reserved_columns: tuple[str, ...],
        image_paths: bool | None,
    ) -> ImageFolder:
        listing = location.listing()
        images = [p for p in listing.paths if kind_of(p) == cls.kind]
        skipped = len(listing.paths) - len(images)
        if not images:
            raise MemscoreError(
                f"{location.given}: no image files found (looked for "
                f"{', '.join(IMAGE_EXTENSIONS)}; {skipped} other files)"
            )
        return cls(
            location.given,
            tuple(location.full(p) for p in images),
            listing.base_dir,
            (path_column,),
            path_column,
            location.storage_options,
            skipped_files=skipped,
        )

    def fingerprint(self) -> str:
        """The image paths, in order: the folder's rows."""
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(path.encode() + b"\0")
        return digest.hexdigest()

    def file_tables(self, columns: tuple[str, ...] | None = None) -> Iterator[tuple[str, pa.Table]]:
        for start in range(0, len(self.files), BATCH_ROWS):
            paths = pa.array(self.files[start : start + BATCH_ROWS], pa.string())
            table = pa.table({self.path_column: paths})
            yield self.source, table if columns is None else table.select(list(columns))

    def image_reading(self) -> dict[str, Any]:
        # A scanned folder is all the job may read: symlinks out of it are refused per row.
        local = not storage.is_url(self.base_dir)
        return {**super().image_reading(), "confine_to": self.base_dir if local else None}
