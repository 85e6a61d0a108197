"""A pickle that runs code when it is loaded: unpickling it creates a marker file.

A test that memscore refuses a pickle, or never unpickles one, asserts that the marker is
absent afterwards, and, as its control, that plain ``pickle.loads`` of the same bytes creates
it: the payload does run when unpickled, so its absence means memscore did not unpickle it.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

__all__ = ["TouchesMarker"]


class TouchesMarker:
    """Pickles as ``os.system("touch MARKER")``: a shell command, as a hostile file would hold.

    The pickle names ``os.system`` (``posix.system``), not this class, so it unpickles in any
    process, a Ray worker's included.
    """

    def __init__(self, marker: str | Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))
