"""A row's error: what a row whose image cannot be scored carries instead of pixels.

A failure that is a fact about the image (missing, not an image, truncated, too large ...) is
the row's ``memscore_error``, ``"{kind}: {detail}"`` on one short line, with ``kind`` one of a
small set of stable kinds (``ERROR_KINDS``): the run summary groups errors by kind, and
``--resume --retry-errors`` picks the rows to score again by kind. Reading a row's bytes
(``memscore.stages.fetch``) and decoding them (``memscore.stages.decode``) both raise ``ImageDecodeError``; it
lives here so that the reading side never imports the Pillow side for it.
"""

from __future__ import annotations

__all__ = ["ERROR_KINDS", "ImageDecodeError", "MAX_DETAIL"]

#: Every error kind fetching and decoding a row produce. The model stage adds ``model failed``
#: and the WebDataset reader its own (``webdataset.READ_ERROR_KINDS``); the run summary counts
#: errors by whatever kind a row's error names.
ERROR_KINDS = (
    "missing path",
    "missing file",
    "not a file",
    "unreadable",
    "empty file",
    "too large",
    "not an image",
    "truncated",
    "decompression bomb",
    "unsupported path",
    "decode failed",
    "outside input folder",
)

#: Characters of detail a row's error keeps: one line in a Parquet cell and in the summary.
MAX_DETAIL = 300


class ImageDecodeError(Exception):
    """A row that cannot be decoded. ``str(exc) == f"{kind}: {detail}"``, one short line.

    Example:
        >>> str(ImageDecodeError("missing file", "photos/a.jpg"))
        'missing file: photos/a.jpg'
    """

    def __init__(self, kind: str, detail: str = ""):
        detail = " ".join(str(detail).split())  # one line
        if len(detail) > MAX_DETAIL:
            detail = detail[: MAX_DETAIL - 3] + "..."
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}" if detail else kind)

    def __reduce__(self):
        return (type(self), (self.kind, self.detail))
