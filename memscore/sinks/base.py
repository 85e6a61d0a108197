"""The one interface of an output format: a ``Sink`` writes a run's scored rows as files in the
output folder and reads them back (to count them, verify them, resume or repair the run).

Ray Data's own datasinks are the pattern (``csv_datasink.py``): one small class per format behind
a base class. The folder's other rules (what memscore owns there, the summary written last,
the lease) are the format's neighbours in ``memscore.sinks.folder``; the run's bookkeeping is
``memscore.sinks.resume``. A format is chosen by name from ``memscore.sinks.SINKS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from memscore import storage
from memscore.columns import ERROR as ERROR_COLUMN, ROW as ROW_COLUMN
from memscore.errors import MemscoreError

__all__ = ["Sink", "PART_PREFIX", "RowIds"]

#: How memscore names its data files in an output folder: ``memscore-part_<write id>_<task>``
#: plus the format's suffix. Recognisably memscore's, so --overwrite can tell them apart.
PART_PREFIX = "memscore-part"


class Sink(ABC):
    """An output format: where a run's rows go, and how they are read back.

    Args:
        output: the output folder (local or a URL such as ``s3://bucket/scores``).
        storage_options: fsspec options (S3 endpoint and credentials).

    A subclass sets ``name`` and ``suffix`` and implements ``write`` (a Ray Dataset into the
    folder, each file committed through Ray's checkpointing), ``schema_of``, ``read_file`` and
    ``write_file`` (one file); counting, reading back and finding its files are shared.
    """

    #: the format's name (``--output-format``)
    name: ClassVar[str]
    #: the suffix of its data files, e.g. ".parquet"
    suffix: ClassVar[str]
    #: whether its files hold binary columns (an image's bytes kept by --keep-image-column)
    holds_bytes: ClassVar[bool] = True

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None):
        self.output = output
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = storage.url_to_fs(output, self.storage_options)

    # ---------------------------------------------------------------- what each format does
    @abstractmethod
    def write(self, dataset, rows_per_file: int) -> None:
        """Write ``dataset`` (a Ray Dataset) into the folder, in files of ``rows_per_file``
        rows named ``<PART_PREFIX>_<write id>_<task><suffix>`` (what Ray's checkpointing keys
        its pending and committed ids by)."""

    @abstractmethod
    def schema_of(self, path: str) -> pa.Schema:
        """The Arrow schema of the data file ``path`` (a path inside ``self.fs``)."""

    @abstractmethod
    def read_file(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """``columns`` (all when None) of the data file ``path``."""

    @abstractmethod
    def write_file(self, path: str, table: pa.Table) -> None:
        """Write ``table`` as one data file at ``path`` (a repair rewriting a file)."""

    def may_hold_errors(self, path: str) -> bool:
        """Whether the file ``path`` may hold a row with ``memscore_error`` set; a format
        whose files say (Parquet's statistics) answers without reading the rows."""
        return True

    # --------------------------------------------------------------------- shared by all
    def columns_of(self, path: str) -> list[str]:
        """The column names of the data file ``path``."""
        return list(self.schema_of(path).names)

    @classmethod
    def is_own_file(cls, name: str) -> bool:
        """Whether a top-level entry of the output folder is one of this format's data files."""
        return name.startswith(PART_PREFIX + "_") and name.endswith(cls.suffix)

    def files(self) -> list[str]:
        """The run's data files (paths inside ``self.fs``), not those under ``_`` or ``.``
        folders (the run's work folder)."""
        if not self.fs.exists(self.root):
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(
            p
            for p in self.fs.find(self.root)
            if p.endswith(self.suffix)
            and not any(part.startswith(("_", ".")) for part in p[len(root) :].split("/"))
        )

    def read(self, columns: list[str], files: list[str] | None = None) -> pa.Table:
        """``columns`` of every data file (or of ``files``) as one table; one line naming a
        column the output does not have."""
        files = self.files() if files is None else files
        tables = []
        for path in files:
            missing = [c for c in columns if c not in self.columns_of(path)]
            if missing:
                raise MemscoreError(f"{self.output}: the output has no column {missing[0]!r}")
            tables.append(self.read_file(path, columns))
        if not tables:
            return pa.table({c: pa.array([]) for c in columns})
        return pa.concat_tables(tables, promote_options="permissive")

    def count(self, score_columns: list[str], expected_rows) -> dict[str, Any]:
        """Rows, scored rows and error kinds, read back from the files just written, and
        whether every expected row id is there exactly once (``complete``).

        ``expected_rows``: a manifest's row count N (ids ``0 .. N-1``), or a WebDataset run's
        list of samples per shard (ids ``shard << 32 | 0 .. samples - 1``).

        Ids are counted, not rows: one row lost and another written twice must not pass; ids
        outside the range are ``unexpected``. Files are read a few at a time by a thread pool:
        the driver holds one byte per expected row (how often each id was seen, up to 2) and
        one file's columns per thread, not the output.
        """
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        files = self.files()
        wanted = [ROW_COLUMN, ERROR_COLUMN, *score_columns]
        space = RowIds(expected_rows)
        seen = np.zeros(space.total, dtype=np.uint8)
        outside = {"rows": 0, "examples": []}  # ids no manifest row has
        by_kind: dict[str, int] = {}
        totals = {"rows": 0, "errors": 0, "scored": None}

        def one_file(path: str):
            names = self.columns_of(path)
            missing = [c for c in (ROW_COLUMN, *score_columns) if c not in names]
            if missing:
                raise MemscoreError(f"{self.output}: {path} has no column {missing[0]!r}")
            table = self.read_file(path, [c for c in wanted if c in names])
            ids, counts = np.unique(table.column(ROW_COLUMN).to_numpy(), return_counts=True)
            errors = (
                table.column(ERROR_COLUMN).drop_null()
                if ERROR_COLUMN in names
                else pa.array([], pa.string())
            )
            # the kind is the text before the first ":"; counted here, per file, so that what a
            # file hands back is a few kinds, not its (often all distinct) error strings
            kind_of = pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0)
            kinds = {
                item["values"]: item["counts"] for item in pc.value_counts(kind_of).to_pylist()
            }
            scored = min(
                (table.num_rows - table.column(c).null_count for c in score_columns), default=0
            )
            return table.num_rows, ids, counts, len(errors), kinds, scored

        with ThreadPoolExecutor(max_workers=8) as pool:
            for rows, ids, counts, errors, kinds, scored in _bounded_map(pool, one_file, files, 16):
                totals["rows"] += rows
                totals["errors"] += errors
                totals["scored"] = scored + (totals["scored"] or 0)
                inside, positions = space.positions(ids)
                outside["rows"] += int(counts[~inside].sum())
                outside["examples"] = (outside["examples"] + ids[~inside][:5].tolist())[:5]
                counts = counts[inside]
                seen[positions] = np.minimum(seen[positions].astype(np.int64) + counts, 2).astype(
                    np.uint8
                )
                for kind, n in kinds.items():
                    by_kind[kind] = by_kind.get(kind, 0) + n
        missing = np.flatnonzero(seen == 0)
        doubled = np.flatnonzero(seen > 1)
        return {
            "rows_out": totals["rows"],
            "rows_scored": totals["scored"] or 0,
            "rows_with_errors": totals["errors"],
            "error_kinds": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])[:10]),
            "complete": (
                len(missing) == 0
                and len(doubled) == 0
                and not outside["rows"]
                and totals["rows"] == space.total
            ),
            "rows_missing": len(missing),
            "rows_duplicated": len(doubled),
            "rows_unexpected": outside["rows"],
            "missing_examples": space.ids(missing[:5]).tolist(),
            "duplicated_examples": space.ids(doubled[:5]).tolist(),
            "unexpected_examples": outside["examples"],
        }


class RowIds:
    """The row ids a run must write, as positions ``0 .. total - 1`` of a tally.

    A manifest's ids are its row positions, ``0 .. rows - 1``. WebDataset ids are
    ``shard << 32 | sample`` (``webdataset.sample_id``) with ``sample < samples[shard]``: the
    position is the shard's offset plus the sample's index."""

    def __init__(self, expected):
        import numpy as np

        self.per_shard = (
            None
            if isinstance(expected, (int, np.integer))
            else np.asarray(list(expected), dtype=np.int64)
        )
        if self.per_shard is None:
            self.total = int(expected)
        else:
            self.offsets = np.concatenate([[0], np.cumsum(self.per_shard)])
            self.total = int(self.offsets[-1])

    def positions(self, ids):
        """(inside: bool mask of ``ids`` that are expected, their positions)."""
        if self.per_shard is None:
            inside = (ids >= 0) & (ids < self.total)
            return inside, ids[inside]
        shard, sample = ids >> 32, ids & 0xFFFFFFFF
        inside = (ids >= 0) & (shard < len(self.per_shard))
        inside[inside] &= sample[inside] < self.per_shard[shard[inside]]
        return inside, self.offsets[shard[inside]] + sample[inside]

    def ids(self, positions):
        """Positions back to row ids."""
        import numpy as np

        if self.per_shard is None:
            return positions
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        return (shard << 32) | (positions - self.offsets[shard])


def _bounded_map(pool, fn, items, window: int):
    """``pool.map(fn, items)`` in order, with at most ``window`` results pending: ``map``
    submits every item at once, and results pile up faster than they are consumed."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
