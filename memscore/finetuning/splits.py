"""Deterministic train / validation / test splits of a labelled manifest.

A row's split comes from the manifest's ``--split-column`` where it has one, otherwise from a
stable hash of the image path (sha256 of ``"<seed>:<path>"`` read as a number in [0, 1)): the
same path lands in the same split on every machine, in every re-run, and in a later
``memscore evaluate`` of the test set, whatever the row order or the number of rows. Duplicated
paths fall in one split, so an image never leaks from training into the test set.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "SPLITS",
    "SPLIT_COLUMN",
    "parse_fractions",
    "hash_unit",
    "assign_splits",
    "normalise_split_column",
]

SPLITS = ("train", "validation", "test")
SPLIT_COLUMN = "split"
# What a split column may say for each split; anything else is an error naming the value.
_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}


def parse_fractions(text: str | tuple[float, ...]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (train, validation, test) fractions; they must sum to 1."""
    parts = text if isinstance(text, tuple) else tuple(text.split(","))
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"split fractions must be three numbers like 0.8,0.1,0.1, got {text!r}"
        ) from None
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise ValueError(
            f"split fractions must be three non-negative numbers summing to 1 "
            f"(train,validation,test), got {text!r}"
        )
    if values[0] == 0 or values[1] == 0:
        raise ValueError("training needs a non-empty train and validation split")
    return values  # type: ignore[return-value]


def hash_unit(key: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by ``key`` and ``seed`` alone."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(
    paths: pa.Array | pa.ChunkedArray, fractions: tuple[float, float, float], seed: int = 0
) -> pa.Array:
    """The split of each path by its hash (a null path still gets one, from its row's empty key)."""
    edges = np.cumsum(fractions)[:2]
    units = np.array([hash_unit(p if p is not None else "", seed) for p in paths.to_pylist()])
    index = np.searchsorted(edges, units, side="right")
    return pa.array(np.array(SPLITS, dtype=object)[index].tolist(), pa.string())


def normalise_split_column(values: pa.Array | pa.ChunkedArray, column: str) -> pa.Array:
    """A user's split column -> train/validation/test; unknown or empty values are an error."""
    text = pc.utf8_lower(pc.utf8_trim_whitespace(pc.cast(values, pa.string())))
    out = []
    for value in text.to_pylist():
        split = _ALIASES.get(value) if value is not None else None
        if split is None:
            raise ValueError(
                f"--split-column {column!r} holds {value!r}; expected one of "
                f"train, validation (or val), test"
            )
        out.append(split)
    return pa.array(out, pa.string())
