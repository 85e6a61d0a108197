"""Where the scored rows go: an output format (a ``Sink``), the output folder's rules
(``folder``), the run's bookkeeping (``resume``) and its one writer (``lease``).

``SINKS`` registers the formats by name (``--output-format``); ``open_sink`` gives the one an
output uses.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from memscore.errors import MemscoreError

if TYPE_CHECKING:
    from memscore.sinks.base import Sink

__all__ = ["SINKS", "DEFAULT_FORMAT", "sink_class", "open_sink", "format_in"]

#: The output formats: ``--output-format`` name -> the class that writes and reads it, as
#: "module:Class". A new format is one module and one line here. Named, not imported: the
#: command line lists the names without importing pyarrow (0.4 s) for ``memscore --help``.
SINKS: dict[str, str] = {
    "parquet": "memscore.sinks.parquet:ParquetSink",
    "jsonl": "memscore.sinks.jsonl:JsonLinesSink",
}
DEFAULT_FORMAT = "parquet"


def sink_class(output_format: str) -> type[Sink]:
    """The ``Sink`` class registered as ``output_format``; one line naming the formats if none."""
    if output_format not in SINKS:
        raise MemscoreError(
            f"--output-format must be one of {', '.join(SINKS)}, not {output_format!r}"
        )
    module, _, name = SINKS[output_format].partition(":")
    return getattr(importlib.import_module(module), name)


def format_in(output: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The format of the data files already in ``output`` (None: none there, or no folder)."""
    from memscore import storage

    fs, root = storage.url_to_fs(output, dict(storage_options or {}))
    try:
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return None
    for output_format in SINKS:
        if any(sink_class(output_format).is_own_file(name) for name in names):
            return output_format
    return None


def open_sink(
    output: str,
    storage_options: Mapping[str, Any] | None = None,
    output_format: str | None = None,
) -> Sink:
    """The ``Sink`` of ``output`` in ``output_format``; None: the format of the files already
    there (what ``verify``, ``evaluate`` and a resumed run read), else the default, Parquet."""
    if output_format is None:
        output_format = format_in(output, storage_options) or DEFAULT_FORMAT
    return sink_class(output_format)(output, storage_options)
