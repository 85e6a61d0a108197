"""``memscore maps``' options: ``MapsConfig``, validated before anything is read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memscore.errors import MemscoreError
from memscore.options import fields_as_args, fix_paths, option

__all__ = ["MapsConfig"]


@fields_as_args
@dataclass(frozen=True)
class MapsConfig:
    """One ``memscore maps`` command. See ``memscore maps --help`` for each field.

    Example:
        >>> MapsConfig("scores/", render="overlays/").validated().limit
        100
    """

    scores: str = field(
        default="",
        metadata=option(
            "A `memscore score --maps` output folder (local or s3://).", positional=True
        ),
    )
    render: str = field(
        default="",
        metadata=option(
            "Folder (local or s3://) for the overlays (overlays/<row>-<name>.png: each photo at "
            "its own size, its map over the region the model saw, the rest dimmed), sheet.png "
            "(the most and least memorable images with their maps) and maps.json. Must be empty "
            "or absent unless --overwrite is given.",
            flag="--render",
        ),
    )
    limit: int = field(
        default=100,
        metadata=option("Overlays for at most this many rows, in row order (0: none)."),
    )
    sheet: int = field(
        default=8,
        metadata=option("Images at each end of the sheet: the N most and N least memorable."),
    )
    column: str | None = field(
        default=None,
        metadata=option(
            "The map column to draw (<score column>_map); by default the output's only one."
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=option(
            "Write into a --render folder that holds files already (files of the same names "
            "are replaced; nothing else is deleted).",
            action="store_true",
        ),
    )
    storage_options: Mapping[str, Any] = field(
        default_factory=dict,
        metadata=option(
            "fsspec/s3fs option KEY=VALUE for s3:// paths, repeatable; as for `memscore score`.",
            flag="--storage-option",
            action="append",
            metavar="KEY=VALUE",
        ),
    )

    def __post_init__(self) -> None:
        fix_paths(self, ("scores", "render"))

    def validated(self) -> MapsConfig:
        """Return self after checking every field; raises MemscoreError naming the first problem."""
        if not self.scores:
            raise MemscoreError("no scores folder given")
        if not self.render:
            raise MemscoreError("no --render given")
        if self.limit < 0:
            raise MemscoreError("--limit must not be negative")
        if self.sheet < 0:
            raise MemscoreError("--sheet must not be negative")
        if self.column is not None and not self.column.endswith("_map"):
            raise MemscoreError(f"--column {self.column!r}: map columns end in _map")
        return self
