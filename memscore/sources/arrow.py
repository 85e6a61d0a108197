"""Arrow IPC tables (``.arrow``, ``.feather``, ``.ipc``): Feather v2 files and Arrow streams.

What ``pyarrow.feather.write_feather`` and ``pa.ipc.new_file`` write (the IPC file format),
and what Hugging Face ``datasets`` keeps in its cache and ``save_to_disk`` folders
(``data-00000-of-00001.arrow``: the IPC stream format). Both are read record batch by record
batch, so a manifest of any size is read in bounded memory, and every column keeps its Arrow
type. Everything else a table manifest does (the checks, the snapshot, the fingerprint by
content) is ``TableSource``'s.

This module is docs/architecture.md's worked example of a new manifest format: this file,
its suffixes in ``formats.SUFFIX_KINDS`` and its line in ``manifest.KINDS``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from memscore.sources.tables import TableSource

__all__ = ["ArrowTables"]


class ArrowTables(TableSource):
    """Arrow IPC, the file format (Feather v2) or the stream format, read by record batch."""

    kind = "arrow"
    what = "an Arrow table"
    columns_from_first_file = True  # the schema comes first in both formats, rows or none

    @classmethod
    def peek(cls, fs, path: str) -> tuple[pa.Schema, bool, bool]:
        with fs.open(path, "rb") as f:
            reader = _open(f)
            schema = reader.schema
            if isinstance(reader, pa.ipc.RecordBatchFileReader):
                has_rows = any(
                    reader.get_batch(i).num_rows for i in range(reader.num_record_batches)
                )
            else:
                has_rows = any(batch.num_rows for batch in reader)
            return schema, True, has_rows

    def read_file(self, fs, inner: str, path: str) -> Iterator[pa.Table]:
        with fs.open(inner, "rb") as f:
            reader = _open(f)
            if isinstance(reader, pa.ipc.RecordBatchFileReader):
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            for batch in batches:
                if batch.num_rows:
                    yield pa.Table.from_batches([batch], schema=reader.schema)


def _open(f) -> pa.ipc.RecordBatchFileReader | pa.ipc.RecordBatchStreamReader:
    """The file format when the file starts with its magic bytes, else the stream format."""
    start = f.read(6)
    f.seek(0)
    return pa.ipc.open_file(f) if start == b"ARROW1" else pa.ipc.open_stream(f)
