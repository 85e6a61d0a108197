"""The column checks a manifest must pass, each a one-line ``MemscoreError``: names that repeat,
names memscore's output would overwrite, a path column that is not text, key values that repeat.

The table reader runs them on the schema and first block (``open_manifest``), the snapshot on
every block (``snapshot.write_snapshot``), ``evaluate`` on its join keys.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from memscore.errors import MemscoreError

__all__ = [
    "check_reserved_columns",
    "check_repeated_columns",
    "check_path_column",
    "repeated_columns_line",
    "repeated_values",
]


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


def repeated_columns_line(file: str, names: list[str], *, json: bool = False) -> str:
    """The one line for column names that repeat in ``file`` (``json``: in one JSON line)."""
    which = ", ".join(repr(n) for n in names)
    where = (
        "is repeated in a JSON line"
        if json
        else ("is repeated" if len(names) == 1 else "are repeated")
    )
    return (
        f"{file}: column name{'s' if len(names) > 1 else ''} {which} {where}; give each "
        f"column its own name"
    )


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
        raise MemscoreError(repeated_columns_line(file, repeated))


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
