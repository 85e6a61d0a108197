"""Where the scored rows go: an output format (a ``Sink``), the output folder's rules
(``folder``), the run's bookkeeping (``resume``) and its one writer (``lease``).

``SINKS`` registers the formats by name; ``open_sink`` gives the one an output uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memscore.sinks.base import Sink
from memscore.sinks.parquet import ParquetSink

__all__ = ["SINKS", "DEFAULT_FORMAT", "open_sink", "Sink"]

#: The output formats by name: a new format is one module and one line here.
SINKS: dict[str, type[Sink]] = {ParquetSink.name: ParquetSink}
DEFAULT_FORMAT = ParquetSink.name


def open_sink(
    output: str, storage_options: Mapping[str, Any] | None = None, output_format: str | None = None
) -> Sink:
    """The ``Sink`` of ``output`` in ``output_format`` (default: Parquet)."""
    return SINKS[output_format or DEFAULT_FORMAT](output, storage_options)
