"""A few rows' images read again after a run: what a report shows beside its figures.

``memscore features``' sheets and ``memscore maps``' overlays show images a run scored. A row
names its image by path (relative paths against the manifest's folder, local or s3://), or,
for a source whose rows carry their images (WebDataset shards, images inside a Parquet
table), is read by the source's own Ray tasks (``Source.dataset_of_rows``), which read only
the shards or row groups holding a wanted row. An image that cannot be read again (moved since
the run) is left out: the caller shows what it can.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from memscore import storage

__all__ = ["images_in_place", "image_bytes", "bytes_by_path", "bytes_in_place"]


def images_in_place(kind: str | None, path_column: str | None) -> bool:
    """Whether the rows of a source of ``kind`` (as a run's summary records it,
    ``manifest_kind``) carry their images; a run recorded before kinds were: whether its rows
    lack a path column."""
    from memscore.sources.manifest import KINDS

    for source in KINDS:
        if source.kind == kind:
            return source.images_in_place
    return path_column in (None, "__key__")


def image_bytes(
    keys: Mapping[int, str | None],
    *,
    in_place: bool,
    key_column: str | None,
    manifest: str,
    path_column: str,
    image_column: str | None,
    base_dir: str | None,
    storage_options: Mapping[str, Any],
) -> dict[int, bytes]:
    """row -> its image's bytes for the rows of ``keys`` (row -> its path or key, as the run's
    output names it in ``key_column``) that can be read again: by the source's own tasks where
    ``in_place``, else by path; none where the rows name no path (a shard's ``__key__``)."""
    if in_place:
        return bytes_in_place(
            manifest,
            keys,
            path_column=path_column,
            storage_options=storage_options,
            image_column=image_column,
        )
    if key_column in (None, "__key__"):
        return {}
    return bytes_by_path(keys, base_dir, storage_options)


def bytes_by_path(
    paths: Mapping[int, str | None], base_dir: str | None, storage_options: Mapping[str, Any]
) -> dict[int, bytes]:
    """row -> its file's bytes, for each row whose path can be read."""
    from memscore.stages.fetch import resolve_path

    data = {}
    for row, path in paths.items():
        if not path:
            continue
        try:
            fs, inner = storage.url_to_fs(resolve_path(path, base_dir), storage_options)
            with fs.open(inner, "rb") as f:
                data[row] = f.read()
        except Exception:  # noqa: BLE001 (moved since the run: the caller shows what it can)
            continue
    return data


def bytes_in_place(
    manifest: str,
    rows: Iterable[int],
    *,
    path_column: str,
    storage_options: Mapping[str, Any],
    image_column: str | None = None,
) -> dict[int, bytes]:
    """row -> its image's bytes, read by ``manifest``'s own Ray tasks where they lie."""
    import pyarrow as pa

    from memscore.columns import ROW
    from memscore.sources.manifest import open_manifest

    rows = sorted(set(rows))
    if not rows:
        return {}
    source = open_manifest(
        manifest,
        path_column=path_column,
        storage_options=storage_options,
        rows_in_driver=False,
        image_column=image_column,
    )
    column = source.image_reading()["bytes_column"]
    dataset = source.dataset_of_rows(pa.array(rows, pa.int64()))
    data = {}
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=64):
        for row, raw in zip(batch.column(ROW).to_pylist(), batch.column(column).to_pylist()):
            if raw is not None:
                data[row] = raw
    return data
