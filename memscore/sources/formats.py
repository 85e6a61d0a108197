"""The one table of file-name suffixes: which kind of source a file of that name belongs to.

Every module of ``memscore.sources`` asks this table, so that what a folder scan calls an image,
what the table reader opens as CSV and what the WebDataset check takes for a file rather than a
folder can never disagree (they did when each module kept a list of its own).
"""

from __future__ import annotations

__all__ = ["IMAGE_EXTENSIONS", "SHARD_SUFFIXES", "SUFFIX_KINDS", "kind_of", "names_a_file"]

#: Image files a folder scan scores, and a WebDataset sample's image members, in order of
#: preference (a sample's first present member is the scored one).
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)
#: WebDataset shards.
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")

#: suffix (lower case) -> the ``Source.kind`` a file of that name is read as. No suffix ends
#: another of another kind, so the order of the entries does not matter.
SUFFIX_KINDS = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".tsv": "csv",
    ".tsv.gz": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".ndjson.gz": "jsonl",
    ".json": "jsonl",
    ".jsonl.gz": "jsonl",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
    **{suffix: "images" for suffix in IMAGE_EXTENSIONS},
    **{suffix: "webdataset" for suffix in SHARD_SUFFIXES},
}


def kind_of(path: str) -> str | None:
    """The kind of source a file named ``path`` belongs to; None for a name of no kind.

    >>> kind_of("s3://b/m.CSV.gz"), kind_of("a/rocket.jpg"), kind_of("0001.tar"), kind_of("x.txt")
    ('csv', 'images', 'webdataset', None)
    """
    lower = path.lower()
    for suffix, kind in SUFFIX_KINDS.items():
        if lower.endswith(suffix):
            return kind
    return None


def names_a_file(path: str) -> bool:
    """Whether ``path``'s last name ends like a table or image file: a file, never a folder of
    shards, so nothing need be listed to tell."""
    return kind_of(path.rstrip("/").rsplit("/", 1)[-1]) not in (None, "webdataset")
