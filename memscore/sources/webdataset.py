"""WebDataset shards -> tables of samples, one row per sample, ready for the decode stage.

A WebDataset shard is a tar file whose members are grouped into samples by name: the *key* is a
member's path up to the first dot of its base name, the *extension* is the rest, lower-cased
(``train/000123.jpg`` and ``train/000123.seg.png`` are the ``jpg`` and ``seg.png`` members of
sample ``train/000123``), and a sample's members are adjacent in the tar. This is the rule of
the webdataset library (``tariterators.base_plus_ext`` and ``group_by_keys``); like it, this
module skips entries that are not regular files, names without a dot, and top-level
``__meta__`` files.

What the user names (``expand_shards``): one ``.tar`` (``.tar.gz``/``.tgz`` too), a brace
pattern (``shards/{000000..000099}.tar``, ``{a,b}``), a glob, or a folder of shards; local or
any fsspec URL (``s3://``). ``is_webdataset`` tells when a source is one; ``WebDatasetShards`` (at
the end) is this kind's ``Source``: how a run reads, counts and checks shards.

One row per sample (``iter_shard``/``read_shard``), columns in this order:

- ``__key__`` (string), ``__url__`` (string: the shard, as ``expand_shards`` named it);
- every member except the scored image, as a column named by its extension, sorted by name:
  ``txt``, ``json``, ``cls`` ... (``TEXT_MEMBERS``) as UTF-8 strings when every value in the
  table is UTF-8, else binary; all others binary. Nothing is ever parsed or unpickled: a
  ``.pth``/``.pt``/``.pkl``/``.pickle`` member is its bytes. A sample without a member has null
  there. A second image member (a ``png`` mask beside the ``jpg``) is such a binary column;
- ``memscore_row`` (int64): the row's id, ``sample_id(shard_index, sample_index)`` =
  ``shard_index << 32 | sample_index``, where ``shard_index`` is the shard's position in
  ``expand_shards``'s sorted list and ``sample_index`` the sample's 0-based position in its
  shard (error rows count too, so a shard's ids are exactly ``0 .. n-1`` in its low half). It is
  the stable id resume and verify key on, as a manifest row's position is; it orders rows by
  (shard, position), and ``split_sample_id`` gives the two back. It is ``memscore_row`` itself,
  not a column of its own, because Ray's ``CheckpointConfig`` takes one id column and the
  output's completeness check counts that column for every manifest kind; unlike a manifest's
  ids these are not ``0 .. N-1`` over the run, so that check needs each shard's row count.
  (``__url__``, ``__key__``) names a row for people, and is unique except on "duplicate key"
  and "unsorted shard" rows;
- ``memscore_error`` (string): null, or ``"<kind>: <detail>"`` for a row that cannot be scored
  (``READ_ERROR_KINDS``; the decode stage's own errors keep the same form);
- ``__memscore_image`` (binary) and ``__memscore_image_ext`` (string): the scored member's
  bytes and extension, the first of ``IMAGE_MEMBERS`` (the manifest's image extensions, in its
  order) present; internal, never written; null on an error row.

Column sets differ between samples: within one table a missing member is null. Tables of one
shard read in pieces, and tables of different shards, can differ in their member columns and
in a text column's type (string in one, binary in another where a value was not UTF-8);
``unify_tables`` (missing -> null, string + binary -> binary) is the one rule for joining them.

Bad shards: every sample that can be read is a row, a problem is a row's ``memscore_error``,
and nothing hangs or is split silently:

- ``missing shard``: the shard went away after it was listed: one row, ``__key__`` null.
- ``not a tar``: the first header does not parse (an image renamed ``.tar``, an empty file,
  a broken gzip): one row, ``__key__`` null.
- ``empty shard``: a well-formed tar without a single sample: one row, ``__key__`` null, so
  the shard is seen in the output.
- ``truncated shard``: a tar cut short or damaged after its first header. The samples before
  the damage are rows as usual; the sample being read when it was found becomes the error row
  (with the members read so far), since it may be incomplete; what follows is unreadable and
  the detail says so. A tar cut exactly between two members (which Python's ``tarfile`` takes
  for a clean end) is caught: a shard is complete only when its end-of-archive block is read.
  A ``.tar.gz`` whose gzip checksum fails (checked at its end) makes its last sample the error
  row; the samples before it were handed on already (the decoder still checks their images).
- ``duplicate key`` / ``unsorted shard``: a key seen again after another key (or after a
  repeated member name) started. The first group of a key is its sample, read as usual; every
  later group of that key is an error row with its own members, never merged into the first
  (which may already have been handed on) and never scored. It is ``duplicate key`` when the
  later group repeats a member name of the first (two samples with one key), else ``unsorted
  shard`` (the members of one sample lie apart). The rule is the same however a shard is cut
  into tables, so ids and errors never depend on ``max_table_bytes``.
- ``no image``: a sample without an image member; its other members are kept.
- ``too large``: a member above ``max_member_bytes`` (never read into memory).
- ``reserved name``: a member whose extension is a column memscore adds (``__key__``,
  ``memscore_*``, ``__memscore*``, or one of ``reserved_columns``, e.g. the score columns).

An error reading the storage itself (permission denied, a connection lost after the S3
client's retries) is not a property of the shard: it raises ``OSError`` naming the shard, the
read task fails, and a resumed run reads the shard again.

Reading: one sequential pass per shard with ``tarfile`` in stream mode (``r|*``: plain, bzip2
or xz; gzip through ``gzip.GzipFile``, which checks the gzip checksum) over an fsspec file: on
S3 one HEAD, then sequential ranged GETs of s3fs's block size (50 MiB, its read-ahead cache),
never a request per member. Memory per shard being read: that block, the table being built
(``max_table_bytes``), one member, and the shard's keys (to find a key seen again).

Why not ``ray.data.read_webdataset`` (Ray 2.60, alpha): its default decoder turns every
``jpg``/``png`` into a PIL image (then a NumPy array) in the read task, decoding before
memscore's decode stage and its limits (bomb checks, pixel budget, error kinds); it unpickles
``.pth``/``.pkl`` members with ``torch.load``/``pickle.loads`` unless they are refused through
an environment variable; rows are Python dicts gathered into pandas frames of 512 samples
(object columns, a copy of every member); an unsorted shard or a repeated member raises and
fails the whole read task, an error that is not per-row data; a truncated tar ends silently
where ``tarfile`` stops; and it adds no stable row id for Ray Data's checkpoint. What it does
well is reused here: the key rule, ``r|*`` streaming, and one read task per shard
(``read_shards``, a Ray ``Datasource``).
"""

from __future__ import annotations

import functools
import glob as globlib
import gzip
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from memscore import columns, storage
from memscore.errors import MemscoreError, counted, first_line
from memscore.row_errors import ImageDecodeError
from memscore.sources.base import (
    Location,
    RowsRead,
    Snapshot,
    Source,
    fingerprint_files,
    local_path,
)
from memscore.sources.formats import IMAGE_EXTENSIONS, SHARD_SUFFIXES, names_a_file
from memscore.sources.snapshot import LIGHT_STAGE_CPUS
from memscore.stages.fetch import DEFAULT_MAX_BYTES

__all__ = [
    "WebDatasetShards",
    "KEY",
    "URL",
    "IMAGE",
    "IMAGE_EXT",
    "SHARD_SUFFIXES",
    "IMAGE_MEMBERS",
    "TEXT_MEMBERS",
    "READ_ERROR_KINDS",
    "DEFAULT_MAX_TABLE_BYTES",
    "expand_braces",
    "expand_shards",
    "is_webdataset",
    "sample_id",
    "split_sample_id",
    "iter_shard",
    "read_shard",
    "unify_tables",
    "read_shards",
    "scan_members",
    "write_shard_count",
    "read_shard_counts",
]

#: The sample's key and its shard, as the webdataset library names them.
KEY = "__key__"
URL = "__url__"
#: Internal columns: the scored member's bytes and its extension (never written).
IMAGE = columns.IMAGE
IMAGE_EXT = columns.IMAGE + "_ext"

#: Extensions of members that can be the scored image, in order of preference.
IMAGE_MEMBERS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
#: Members kept as UTF-8 strings (by their last extension: ``en.txt`` too) when they are UTF-8.
TEXT_MEMBERS = frozenset(
    {
        "txt",
        "text",
        "caption",
        "transcript",
        "json",
        "jsonl",
        "cls",
        "cls2",
        "class",
        "id",
        "index",
        "inx",
        "count",
        "html",
        "htm",
        "xml",
        "csv",
        "tsv",
        "md",
        "yaml",
        "yml",
    }
)
#: Every error kind the reader produces (``memscore_error`` is ``"<kind>: <detail>"``).
READ_ERROR_KINDS = (
    "missing shard",
    "not a tar",
    "empty shard",
    "truncated shard",
    "duplicate key",
    "unsorted shard",
    "no image",
    "too large",
    "reserved name",
)
#: Member bytes per table handed on: Ray Data's blocks stay well under its 128 MiB target.
DEFAULT_MAX_TABLE_BYTES = 64 * 2**20

_SAMPLE_BITS = 32
_MAX_SHARDS = 2**31  # shard_index << 32 stays a positive int64
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


# ------------------------------------------------------------------------------------- ids
def sample_id(shard_index: int, sample_index: int) -> int:
    """The row id of sample ``sample_index`` of shard ``shard_index``: ``shard << 32 | sample``.

    >>> sample_id(3, 7), split_sample_id(sample_id(3, 7))
    (12884901895, (3, 7))
    """
    if not 0 <= shard_index < _MAX_SHARDS:
        raise ValueError(f"shard index {shard_index} is outside 0 .. {_MAX_SHARDS - 1}")
    if not 0 <= sample_index < 2**_SAMPLE_BITS:
        raise ValueError(f"sample index {sample_index} is outside 0 .. {2**_SAMPLE_BITS - 1}")
    return shard_index << _SAMPLE_BITS | sample_index


def split_sample_id(row_id: int) -> tuple[int, int]:
    """``sample_id``'s inverse: (shard index, sample index)."""
    return row_id >> _SAMPLE_BITS, row_id & (2**_SAMPLE_BITS - 1)


# ---------------------------------------------------------------------------------- shards
def _is_shard_name(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


def _brace_options(body: str) -> list[str] | None:
    """The alternatives of one ``{...}``: a numeric range or a comma list; None: literal."""
    match = _RANGE.match(body)
    if match:
        left, right, step = match.group(1), match.group(2), match.group(3)
        start, end, incr = int(left), int(right), abs(int(step or 1)) or 1
        # the brace-expansion rule (bash, braceexpand): a bound with a leading zero pads
        # every number to the longer bound's length
        padded = any(s.lstrip("-").startswith("0") and s.lstrip("-") != "0" for s in (left, right))
        width = max(len(left), len(right)) if padded else 0
        values = range(start, end + 1, incr) if start <= end else range(start, end - 1, -incr)
        return [f"{v:0{width}d}" for v in values]
    if "," in body:
        return body.split(",")
    return None


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as the webdataset library (``braceexpand``) does it, in pattern order.

    Numeric ranges ``{000..012}`` (zero-padded when a bound is), with a step ``{0..10..5}``,
    comma lists ``{train,val}``, several braces (nested ones expand inside out, and may repeat
    an alternative); ``{x}`` stays literal.

    >>> expand_braces("s/{000..002}.tar")
    ['s/000.tar', 's/001.tar', 's/002.tar']
    >>> expand_braces("{a,b}-{1..2}")
    ['a-1', 'a-2', 'b-1', 'b-2']
    """
    for match in _BRACE.finditer(pattern):
        options = _brace_options(match.group(1))
        if options is None:
            continue
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [out for option in options for out in expand_braces(head + option + tail)]
    return [pattern]


def _full(source: str, path: str) -> str:
    """A path inside a filesystem back in the user's form (with the scheme for URLs)."""
    if storage.is_url(source):
        return f"{source.split('://', 1)[0]}://{path}"
    return path


def _memscores_own(path: str) -> bool:
    return any(part.startswith("_memscore") for part in path.split("/"))


def _names_in(fs, folder: str) -> set[str] | None:
    """The file paths directly in ``folder`` (one listing), or None when it cannot be listed."""
    try:
        return {
            info["name"].rstrip("/")
            for info in fs.ls(folder, detail=True)
            if info.get("type") == "file"
        }
    except (FileNotFoundError, NotADirectoryError):
        return None


def expand_shards(source: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The shards ``source`` names, sorted, each once: local paths or URLs in ``source``'s form.

    Args:
        source: a ``.tar`` (``.tar.gz``, ``.tgz``) file, a brace pattern
            (``s3://b/shards/{000000..000099}.tar``, ``{train,val}/{0..9}.tar``), a glob
            (``shards/*.tar``), or a folder (its shard files, at any depth; ``_memscore*``
            entries and other files left out). Braces expand first; a brace alternative may
            itself be a glob. Local paths are made absolute.
        storage_options: fsspec options (e.g. S3 endpoint and credentials).

    Raises:
        MemscoreError: (one line) nothing matches, a named shard is missing, or the source
            cannot be listed.

    Example (``s3://bucket/laion/{00000..00099}.tar`` reads the same way):
        >>> import os, tarfile
        >>> os.mkdir("shards")
        >>> for i in range(3):  # one sample each, its image member 00000i.jpg
        ...     with tarfile.open(f"shards/{i:05d}.tar", "w") as tar:
        ...         tar.add("examples/images/rocket.jpg", arcname=f"{i:05d}.jpg")
        >>> [os.path.basename(url) for url in expand_shards("shards/{00000..00001}.tar")]
        ['00000.tar', '00001.tar']
        >>> shards = expand_shards("shards")
        >>> len(shards), read_shard(shards[2], shard_index=2).num_rows
        (3, 1)
    """
    options = dict(storage_options or {})
    source = storage.absolute(source)
    try:
        fs, _ = storage.url_to_fs(source.replace("{", "").replace("}", ""), options)
    except Exception as exc:
        raise MemscoreError(f"cannot open {source}: {first_line(exc)}") from None
    fs.invalidate_cache()  # a listing cached by an earlier call in this process may be stale
    found: set[str] = set()
    named: list[str] = []  # explicit shard paths, checked with one listing per folder
    try:
        for pattern in expand_braces(source):
            inner = fs._strip_protocol(pattern)
            if globlib.has_magic(inner):
                found.update(
                    p
                    for p, info in fs.glob(inner, detail=True).items()
                    if info.get("type") == "file" and _is_shard_name(p) and not _memscores_own(p)
                )
            elif _is_shard_name(inner):
                named.append(inner)
            elif fs.isdir(inner):
                found.update(
                    p
                    for p in fs.find(inner)
                    if _is_shard_name(p) and not _memscores_own(p[len(inner) :])
                )
            elif fs.exists(inner):
                raise MemscoreError(f"{source}: {_full(source, inner)} is not a .tar shard")
            else:
                raise MemscoreError(f"{source}: no such file or folder: {_full(source, inner)}")
        missing = []
        folders: dict[str, set[str] | None] = {}
        for path in named:
            folder = path.rsplit("/", 1)[0] if "/" in path else ""
            if folder not in folders:
                folders[folder] = _names_in(fs, folder or ".")
            listed = folders[folder]
            if (path in listed) if listed is not None else fs.isfile(path):
                found.add(path)
            else:
                missing.append(path)
    except MemscoreError:
        raise
    except Exception as exc:
        raise MemscoreError(f"{source}: cannot list the shards: {first_line(exc)}") from None
    if missing:
        raise MemscoreError(
            f"{source}: {len(missing)} of {len(named)} named shards are missing, e.g. "
            f"{_full(source, missing[0])}"
        )
    if not found:
        raise MemscoreError(f"{source}: matches no shard (looked for {', '.join(SHARD_SUFFIXES)})")
    return sorted(_full(source, p) for p in found)


def is_webdataset(source: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``source`` names WebDataset shards (what ``open_manifest`` can ask first).

    True for a path, glob or brace pattern whose names end in ``.tar`` (``.tar.gz``, ``.tgz``),
    and for a folder holding shard files and no image files (``_memscore*`` entries and hidden
    files aside): img2dataset's output folder has a ``.parquet`` and a ``_stats.json`` beside
    each shard. Only the folder case touches the storage (one listing); a source that cannot
    be listed is not a WebDataset here, and the manifest module reports it as before.
    """
    names = expand_braces(source.rstrip("/"))
    if all(_is_shard_name(name) for name in names):
        return True
    if len(names) > 1 or globlib.has_magic(source):
        return False
    if names_a_file(source):  # a manifest or image file: no request to ask
        return False
    try:
        fs, root = storage.url_to_fs(storage.absolute(source), storage_options)
        if not fs.isdir(root):
            return False
        files = [
            p
            for p in fs.find(root)
            if not _memscores_own(p[len(root) :]) and not p.rsplit("/", 1)[-1].startswith(".")
        ]
    except Exception:
        return False
    shards = [p for p in files if _is_shard_name(p)]
    return bool(shards) and not any(
        p.rsplit(".", 1)[-1].lower() in IMAGE_MEMBERS for p in files if "." in p
    )


# ---------------------------------------------------------------------------------- reading
@dataclass
class _Group:
    """A sample being gathered: the members of one key, in tar order."""

    key: str | None
    index: int
    members: dict[str, bytes] = field(default_factory=dict)
    suffixes: set[str] = field(default_factory=set)  # also those not kept (too large)
    error: str | None = None
    first: tuple[int, frozenset] | None = None  # (index, member names) of the key's first group
    nbytes: int = 0


class _TarInfo(tarfile.TarInfo):
    """Records why ``tarfile`` stopped: only an end-of-archive block is a clean end.

    In stream mode ``tarfile`` ends iteration without an error at a header it cannot read
    (nothing there, a partial block, garbage) unless it is the first one, so a shard cut between
    two members would look complete.
    """

    @classmethod
    def fromtarfile(cls, tar):
        tar._memscore_stop = None
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar._memscore_stop = exc
            raise


def _is_reserved(name: str, reserved: frozenset) -> bool:
    return name in reserved or name.startswith(("memscore_", "__memscore"))


def _error(kind: str, detail: str) -> str:
    return str(ImageDecodeError(kind, detail))  # one line, detail capped: the decode stage's form


class _Shard:
    """One pass over one shard: yields its samples as finished ``_Group``s, in order."""

    def __init__(
        self,
        url: str,
        storage_options,
        max_member_bytes: int,
        image_members: tuple[str, ...],
        reserved: frozenset,
    ):
        self.url = url
        self.options = dict(storage_options or {})
        self.max_member_bytes = max_member_bytes
        self.image_members = image_members
        self.reserved = reserved
        self.seen: dict[str, tuple[int, frozenset]] = {}
        self._sets: dict[frozenset, frozenset] = {}  # one shared frozenset per member-name set
        self.index = 0  # next sample index
        self.complete = 0  # samples finished before the current one

    def _new(self, key: str | None) -> _Group:
        group = _Group(key, self.index)
        sample_id(0, self.index)  # a shard of more than 2**32 samples is refused here
        self.index += 1
        if key is not None:
            group.first = self.seen.get(key)
        return group

    def _finish(self, group: _Group) -> _Group:
        names = frozenset(group.suffixes)
        names = self._sets.setdefault(names, names)
        if group.key is not None and group.first is None:
            self.seen[group.key] = (group.index, names)
        self.complete += 1
        if group.error is not None:
            return group
        if group.first is not None:
            first, first_names = group.first
            common = sorted(names & first_names)
            if common:
                group.error = _error(
                    "duplicate key",
                    (
                        f"key {group.key!r} again as sample {group.index} of {self.url}, with the "
                        f"same member names as sample {first} ({', '.join(common)}): two samples "
                        f"share one key; only sample {first} is scored"
                    ),
                )
            else:
                group.error = _error(
                    "unsorted shard",
                    (
                        f"members {', '.join(sorted(names))} of key {group.key!r} lie apart from "
                        f"its sample {first} in {self.url} (other entries between them); sample "
                        f"{first} is scored without them. Write shards sorted by name "
                        f"(tar --sort=name)"
                    ),
                )
            return group
        reserved = sorted(s for s in group.suffixes if _is_reserved(s, self.reserved))
        if reserved:
            group.error = _error(
                "reserved name",
                (
                    f"member {group.key}.{reserved[0]} of {self.url} would be column "
                    f"{reserved[0]!r}, which memscore adds"
                ),
            )
        elif not any(ext in group.members for ext in self.image_members):
            group.error = _error(
                "no image",
                (
                    f"sample {group.key!r} of {self.url} has no image member (members: "
                    f"{', '.join(sorted(group.suffixes)) or 'none'})"
                ),
            )
        return group

    def groups(self) -> Iterator[_Group]:
        fs, inner = storage.url_to_fs(self.url, self.options)
        try:
            f = fs.open(inner, "rb")
        except FileNotFoundError:
            group = self._new(None)
            group.error = _error("missing shard", self.url)
            yield self._finish(group)
            return
        except OSError as exc:
            raise OSError(f"{self.url}: cannot open the shard: {first_line(exc)}") from exc
        with f:
            yield from self._read(f)

    def _read(self, f) -> Iterator[_Group]:
        current: _Group | None = None
        entries = 0
        try:
            source, mode = _decompressed(f)
            tar = tarfile.open(fileobj=source, mode=mode, tarinfo=_TarInfo)
            for info in tar:
                entries += 1
                tar.members = []  # stream mode keeps every TarInfo otherwise
                name = info.name
                if not info.isreg() or _META.match(name):
                    continue
                match = _NAME.match(name)
                if match is None:  # no extension: not part of any sample
                    continue
                key, suffix = match.group(1), match.group(2).lower()
                if current is None or key != current.key or suffix in current.suffixes:
                    if current is not None:
                        yield self._finish(current)
                    current = self._new(key)
                current.suffixes.add(suffix)
                if info.size > self.max_member_bytes:
                    current.error = current.error or _error(
                        "too large",
                        (
                            f"member {name} of {self.url} is {info.size} bytes > max_member_bytes "
                            f"{self.max_member_bytes}"
                        ),
                    )
                    continue  # never read; tarfile skips its data
                data = tar.extractfile(info).read()
                current.members[suffix] = data
                current.nbytes += len(data)
            stop = getattr(tar, "_memscore_stop", None)
            if not isinstance(stop, tarfile.EOFHeaderError):
                detail = (
                    "ends without its end-of-archive block"
                    if stop is None or isinstance(stop, tarfile.EmptyHeaderError)
                    else f"unreadable tar header ({stop})"
                )
                raise tarfile.ReadError(detail)
            if source is not f:  # gzip: read to its trailer, whose checksum is checked there
                while source.read(2**16):
                    pass
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            detail = first_line(exc)
            if entries == 0 and current is None:
                group = self._new(None)
                group.error = _error("not a tar", f"{self.url}: {detail}")
                yield self._finish(group)
                return
            if current is None:
                current = self._new(None)
            current.error = _error(
                "truncated shard",
                (
                    f"{self.url}: {detail} after {self.complete} complete samples; this sample "
                    f"may be incomplete and the rest of the shard cannot be read"
                ),
            )
            yield self._finish(current)
            return
        except OSError as exc:  # the storage, not the shard
            raise OSError(f"{self.url}: reading the shard failed: {first_line(exc)}") from exc
        if current is not None:
            yield self._finish(current)
        elif self.index == 0:
            group = self._new(None)
            group.error = _error(
                "empty shard",
                (f"{self.url} holds no sample ({entries} tar entries, none a file named KEY.EXT)"),
            )
            yield self._finish(group)


def _decompressed(f):
    """The tar stream of ``f``: gzip through ``gzip.GzipFile``, which checks the gzip trailer's
    CRC and length (``tarfile``'s own stream decompressor does not: a corrupted ``.tar.gz``
    would pass); bzip2 and xz, whose decompressors check their own CRCs, through ``tarfile``."""
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb"), "r|"
    return f, "r|*"


class _TableBuilder:
    """Finished groups -> one table: fixed columns, then member columns (missing -> null)."""

    def __init__(
        self,
        url: str,
        shard_index: int,
        image_members: tuple[str, ...],
        reserved: frozenset,
        text_as_string: bool = False,
        members: tuple[str, ...] | None = None,
        dropped: dict | None = None,
    ):
        self.url = url
        self.text_as_string = text_as_string
        self.fixed_members = members
        self.dropped = dropped if dropped is not None else {}
        self.shard_index = shard_index
        self.image_members = image_members
        self.reserved = reserved
        self._reset()

    def _reset(self):
        self.keys: list = []
        self.ids: list[int] = []
        self.errors: list = []
        self.images: list = []
        self.exts: list = []
        self.members: list[dict[str, bytes]] = []
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, group: _Group) -> None:
        members = dict(group.members)
        image = ext = None
        if group.error is None:
            ext = next(e for e in self.image_members if e in members)
            image = members.pop(ext)
        else:  # an error row is never scored: its image member is not handed on either
            for e in self.image_members:
                if e in members:
                    members.pop(e)
                    break
            for name in list(members):
                if _is_reserved(name, self.reserved):
                    del members[name]  # a reserved name cannot be a column
        self.keys.append(group.key)
        self.ids.append(sample_id(self.shard_index, group.index))
        self.errors.append(group.error)
        self.images.append(image)
        self.exts.append(ext)
        self.members.append(members)
        self.nbytes += group.nbytes

    def flush(self) -> pa.Table:
        n = len(self.ids)
        names = sorted({name for row in self.members for name in row})
        if self.fixed_members is not None:  # one schema for every table of the run
            for name in set(names) - set(self.fixed_members):
                self.dropped[name] = self.dropped.get(name, 0) + sum(
                    name in row for row in self.members
                )
            names = sorted(self.fixed_members)
        data = {KEY: pa.array(self.keys, pa.string()), URL: pa.array([self.url] * n, pa.string())}
        for name in names:
            data[name] = _member_column(
                name, [row.get(name) for row in self.members], self.text_as_string
            )
        data[columns.ROW] = pa.array(self.ids, pa.int64())
        data[columns.ERROR] = pa.array(self.errors, pa.string())
        data[IMAGE] = pa.array(self.images, pa.binary())
        data[IMAGE_EXT] = pa.array(self.exts, pa.string())
        self._reset()
        return pa.table(data)


def _member_column(name: str, values: list, text_as_string: bool = False) -> pa.Array:
    """Member bytes -> a string column for text members that are all UTF-8, else binary.

    ``text_as_string``: a text member is a string column whatever its bytes, the bytes that are
    not UTF-8 replaced by U+FFFD, so that every table of a run has one type for it."""
    array = pa.array(values, pa.binary())
    if name.rsplit(".", 1)[-1] in TEXT_MEMBERS:
        try:
            return array.cast(pa.string())  # validates UTF-8
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            if text_as_string:
                return pa.array(
                    [None if v is None else v.decode("utf-8", "replace") for v in values],
                    pa.string(),
                )
    return array


def iter_shard(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    shard_index: int = 0,
    *,
    max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
    max_member_bytes: int = DEFAULT_MAX_BYTES,
    image_members: tuple[str, ...] = IMAGE_MEMBERS,
    reserved_columns: Iterable[str] = (),
    text_as_string: bool = False,
    members: Iterable[str] | None = None,
    dropped: dict | None = None,
) -> Iterator[pa.Table]:
    """One shard's samples as a stream of tables, in tar order, in bounded memory.

    Args:
        url: the shard (a local path or fsspec URL), as ``expand_shards`` gave it; it is the
            ``__url__`` of every row.
        storage_options: fsspec options.
        shard_index: the shard's position in ``expand_shards``'s list: the high half of every
            row's ``memscore_row``.
        max_table_bytes: a table is handed on once its members hold this many bytes.
        max_member_bytes: larger members make their sample a "too large" error row, unread.
        image_members: extensions that can be the scored image, in order of preference.
        reserved_columns: more names no member may take (the run's score columns).
        text_as_string: text members (``TEXT_MEMBERS``) are always strings, bytes that are not
            UTF-8 replaced by U+FFFD (``memscore score`` uses this: its output files must
            agree on each column's type); else such a column is binary in a table where a
            value is not UTF-8.
        members: the member columns of every table, whatever the samples hold (missing ->
            null; with ``text_as_string``, one type per column): Ray Data writes blocks of
            several shards into one file, which needs one schema. Other members are left out
            and counted in ``dropped`` (extension -> samples). None: the members each table's
            samples hold.
        dropped: where the members left out are counted.

    Yields:
        Tables as the module docstring describes; their member columns may differ (see
        ``unify_tables``). Every sample is in exactly one table; ids run ``0 .. n-1`` in order.

    Raises:
        OSError: the storage failed (not the shard's content), naming the shard.
    """
    sample_id(shard_index, 0)  # refuse an out-of-range shard index before any I/O
    reserved = frozenset((KEY, URL, *columns.BOOKKEEPING, columns.ROW, *reserved_columns))
    image_members = tuple(e.lower().lstrip(".") for e in image_members)
    shard = _Shard(url, storage_options, max_member_bytes, image_members, reserved)
    builder = _TableBuilder(
        url,
        shard_index,
        image_members,
        reserved,
        text_as_string,
        None if members is None else tuple(members),
        dropped,
    )
    for group in shard.groups():
        builder.add(group)
        if builder.nbytes >= max_table_bytes:
            yield builder.flush()
    if len(builder):
        yield builder.flush()


def read_shard(
    url: str, storage_options: Mapping[str, Any] | None = None, shard_index: int = 0, **options
) -> pa.Table:
    """One shard as one table (``iter_shard``'s tables unified); for shards that fit memory.

    Example::

        table = read_shard("s3://bucket/shards/000003.tar", {"anon": True}, shard_index=3)
        table.column("__key__"), table.column("txt"), table.column("memscore_error")
    """
    return unify_tables(list(iter_shard(url, storage_options, shard_index, **options)))


_LEADING = (KEY, URL)
_TRAILING = (columns.ROW, columns.ERROR, IMAGE, IMAGE_EXT)


def unify_tables(tables: list[pa.Table]) -> pa.Table:
    """Concatenate sample tables whose member columns differ: missing -> null, and a column that
    is string in one table and binary in another becomes binary (lossless). Columns keep the
    reader's order: key and url, members sorted, then memscore's."""
    if not tables:
        raise ValueError("no tables to unify")
    kinds: dict[str, set] = {}
    for table in tables:
        for f in table.schema:
            kinds.setdefault(f.name, set()).add(f.type)
    as_binary = {
        name
        for name, types in kinds.items()
        if len(types) > 1 and types <= {pa.string(), pa.binary()}
    }
    if as_binary:
        tables = [
            t.cast(
                pa.schema(
                    [pa.field(f.name, pa.binary()) if f.name in as_binary else f for f in t.schema]
                )
            )
            for t in tables
        ]
    merged = pa.concat_tables(tables, promote_options="default")
    fixed = set(_LEADING) | set(_TRAILING)
    members = sorted(n for n in merged.column_names if n not in fixed)
    order = [n for n in (*_LEADING, *members, *_TRAILING) if n in merged.column_names]
    return merged.select(order)


# ------------------------------------------------------------------------------------- Ray
@functools.cache
def _datasource_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class WebDatasetShards(Datasource):
        """One read task per shard; each yields ``iter_shard``'s tables as blocks."""

        def __init__(self, shards, storage_options, reader_options, counts_folder=None):
            super().__init__()
            self.shards = list(shards)
            self.storage_options = dict(storage_options or {})
            self.reader_options = dict(reader_options)
            self.counts_folder = counts_folder

        def estimate_inmemory_data_size(self):
            return None  # unknown without a request per shard

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            # each task carries its shard and the options, not the whole list of shards
            storage_options, reader_options = self.storage_options, self.reader_options
            counts_folder = self.counts_folder
            tasks = []
            for index, url in enumerate(self.shards):

                def read(url=url, index=index):
                    from memscore.stages.fetch import TransientFailure

                    samples, dropped = 0, {}
                    try:
                        for table in iter_shard(
                            url, storage_options, index, dropped=dropped, **reader_options
                        ):
                            samples += table.num_rows
                            yield table
                    except OSError as exc:
                        # the storage failed, not the shard's content: the run stops with one
                        # line, and --resume reads the shard again (its committed rows kept)
                        raise TransientFailure(
                            f"reading shard {url} failed after {samples} samples: {first_line(exc)}"
                        ) from None
                    if counts_folder is not None:  # the shard was read to its end
                        write_shard_count(
                            counts_folder, index, url, samples, storage_options, dropped
                        )

                meta = BlockMetadata(
                    num_rows=None, size_bytes=None, exec_stats=None, input_files=(url,)
                )
                tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
            return tasks

    return WebDatasetShards


def scan_members(
    shards: list[str],
    storage_options: Mapping[str, Any] | None = None,
    samples: int = 1000,
    max_shards: int = 8,
    **reader_options,
) -> tuple[str, ...]:
    """The member columns of the first ``samples`` samples (in up to ``max_shards`` shards):
    what ``memscore score`` writes for every row (``iter_shard``'s ``members``).

    img2dataset's shards hold the same members in every sample (``jpg``, ``txt``, ``json``);
    a member that first appears later in a run is left out and counted in the summary."""
    found: set[str] = set()
    seen = 0
    fixed = set(columns.BOOKKEEPING) | {KEY, URL, columns.ROW, IMAGE, IMAGE_EXT}
    for index, url in enumerate(shards[:max_shards]):
        try:
            for table in iter_shard(url, storage_options, index, **reader_options):
                found.update(c for c in table.column_names if c not in fixed)
                seen += table.num_rows
                if seen >= samples:
                    return tuple(sorted(found))
        except OSError:
            continue  # the run's read task will report it
    return tuple(sorted(found))


def write_shard_count(
    folder: str,
    index: int,
    url: str,
    samples: int,
    storage_options: Mapping[str, Any] | None = None,
    dropped: Mapping[str, int] | None = None,
) -> None:
    """Record that shard ``index`` (``url``) holds ``samples`` rows (and which members were left
    out of how many samples, ``iter_shard``'s ``dropped``): ``folder/<index>.json``."""
    import json

    fs, path = storage.url_to_fs(f"{folder.rstrip('/')}/{index:09d}.json", storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # local folders must exist; S3 has none
    record = {"shard": index, "url": url, "samples": samples, "dropped": dict(dropped or {})}
    storage.pipe_atomic(fs, path, json.dumps(record).encode())


def read_shard_counts(
    folder: str,
    shards: list[str],
    storage_options: Mapping[str, Any] | None = None,
    dropped: dict | None = None,
) -> list[int | None]:
    """Each shard's recorded sample count (``write_shard_count``), None where none is; a
    record naming another URL for its index (the listing changed) is None too. ``dropped``
    (a dict) receives the members left out, summed over the shards."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    fs, root = storage.url_to_fs(folder, storage_options)
    counts: list[int | None] = [None] * len(shards)
    if not fs.exists(root):
        return counts
    files = [p for p in fs.find(root) if p.endswith(".json")]
    with ThreadPoolExecutor(max_workers=16) as pool:
        for record in pool.map(lambda p: json.loads(fs.cat_file(p)), files):
            index = record.get("shard")
            if (
                isinstance(index, int)
                and 0 <= index < len(shards)
                and record.get("url") == shards[index]
            ):
                counts[index] = int(record["samples"])
                if dropped is not None:
                    for name, n in (record.get("dropped") or {}).items():
                        dropped[name] = dropped.get(name, 0) + n
    return counts


def read_shards(
    shards: list[str],
    storage_options: Mapping[str, Any] | None = None,
    counts_folder: str | None = None,
    num_cpus: float | None = None,
    **reader_options,
):
    """The shards as a Ray Dataset of sample rows: one read task per shard, in list order.

    ``shards`` is ``expand_shards``'s list, whole (a row's shard index is its position there;
    a ``--limit`` must cut rows, not this list). The read is a Ray Data ``Read`` operator, so a
    ``CheckpointConfig`` on ``memscore_row`` filters committed rows out right after it (Ray
    still reads every shard again on resume; only decoding and scoring are skipped). Blocks of
    different shards can differ in member columns: Ray Data concatenates blocks with schema
    promotion (missing -> null), but a text column that is string in one block and binary in
    another is a type conflict there; the job should cast such columns (``unify_tables``'s
    rule) before writing.

    Args:
        shards: shard URLs or paths.
        storage_options: fsspec options.
        counts_folder: where each read task records its shard's sample count once it has read
            the shard to its end (``write_shard_count``): the run's completeness check needs
            each shard's row count, known only by reading it. None: not recorded.
        num_cpus: each read task's CPU request to Ray (None: Ray's default, 1).
        **reader_options: ``iter_shard``'s keyword options.
    """
    import ray.data

    datasource = _datasource_class()(shards, storage_options, reader_options, counts_folder)
    return ray.data.read_datasource(
        datasource, override_num_blocks=max(1, len(shards)), num_cpus=num_cpus
    )


def _read_wanted_samples(batch: pa.Table, shards: list[str], storage_options) -> pa.Table:
    """Read task of ``WebDatasetShards.dataset_of_rows``: for each (shard, wanted ids) of
    ``batch``, that shard's wanted samples (id, key, url, error, image member), read up to the
    last wanted one only (samples come in id order)."""
    keep = (KEY, URL, columns.ROW, columns.ERROR, IMAGE, IMAGE_EXT)
    parts = []
    for shard_index, wanted in zip(
        batch.column("shard").to_pylist(), batch.column("wanted").to_pylist()
    ):
        wanted = pa.array(sorted(wanted), pa.int64())
        last = wanted[-1].as_py()
        for table in iter_shard(shards[shard_index], storage_options, shard_index, members=()):
            ids = table.column(columns.ROW)
            table = table.filter(pc.is_in(ids, value_set=wanted))
            parts.append(table.select([name for name in keep if name in table.column_names]))
            if pc.max(ids).as_py() >= last:
                break
    return unify_tables(parts) if parts else pa.table({columns.ROW: pa.array([], pa.int64())})


# ---------------------------------------------------------------------------------- the Source
class WebDatasetShards(Source):
    """WebDataset shards as a source (what the user names: ``expand_shards``): one row per
    sample, read by Ray tasks, one per shard (``read_shards``), never copied into a snapshot
    and never read in the driver.

    Row ids are ``sample_id(shard, sample)``, not positions: a shard's sample count is known
    only once it is read to its end, so each read task records it (``write_shard_count``)
    in the run's ``counts_folder``, the final check and ``memscore verify`` count by those
    records (``rows_read``, ``recorded_rows``), and ``--limit`` and ``--id-column`` are
    refused. The decode stage gets each row's image from its ``__memscore_image`` column.

    The fingerprint: each shard's path, size and modification time (ETag on S3). Hashing the
    shards would read the whole data set (terabytes) before every run and every resume, which
    is not affordable; an edit in place that keeps a shard's size and time is not seen.
    """

    kind = "webdataset"
    what = "WebDataset shards"
    row_ids_are_positions = False
    images_in_place = True

    @classmethod
    def recognises(cls, location: Location) -> bool:
        return is_webdataset(location.given, location.storage_options)

    @classmethod
    def check_readable_in_driver(cls, given: str) -> None:
        raise MemscoreError(
            f"{given}: WebDataset shards can be scored (memscore score), "
            f"not read here; give a table manifest or a folder of images"
        )

    @classmethod
    def open(
        cls,
        location: Location,
        *,
        path_column: str,
        reserved_columns: tuple[str, ...],
        image_paths: bool | None,
    ) -> WebDatasetShards:
        shards = expand_shards(location.given, location.storage_options)
        base = storage.absolute(location.given).split("{")[0].rstrip("/")
        return cls(location.given, tuple(shards), base, (KEY, URL), KEY, location.storage_options)

    def fingerprint(self) -> str:
        return fingerprint_files(self.files, self.storage_options, by_content=False)

    def file_tables(self, columns: tuple[str, ...] | None = None) -> Iterator[tuple[str, pa.Table]]:
        self.check_readable_in_driver(self.source)
        return iter(())

    def check_run_options(self, *, limit: int | None, id_column: str | None) -> None:
        if limit is not None:
            raise MemscoreError(
                f"{self.source}: --limit cannot cut WebDataset shards (a row's id is its place "
                f"in its shard); name fewer shards instead, e.g. shards/{{000000..000009}}.tar"
            )
        if id_column:
            raise MemscoreError(
                f"{self.source}: --id-column is for table manifests; WebDataset "
                f"rows are keyed by shard and sample (__url__, __key__)"
            )

    def freeze(
        self, folder: str, *, limit: int | None, rows_per_file: int, id_column: str | None
    ) -> Snapshot:
        return Snapshot(self.files, None)  # too large to copy: a run reads the shards

    def dataset(self, snapshot: Snapshot, *, reserved_columns: tuple[str, ...], counts_folder: str):
        options = {
            "reserved_columns": tuple(reserved_columns),
            # one type per text member column in every output file (bytes that are not UTF-8
            # become U+FFFD; README)
            "text_as_string": True,
        }
        # Ray writes blocks of several shards into one file, which takes one schema: every row
        # gets the member columns of the first samples (img2dataset's are the same in every
        # sample); a member first seen later is left out, and counted in the summary.
        members = scan_members(list(self.files), self.storage_options, **options)
        return read_shards(
            list(self.files),
            self.storage_options,
            counts_folder=counts_folder,
            # reading a shard is sequential I/O and tar headers: a light share, as the snapshot's
            num_cpus=LIGHT_STAGE_CPUS,
            members=members,
            **options,
        )

    def dataset_of_rows(self, row_ids: pa.Array):
        """The samples ``row_ids`` names, read by one Ray task per shard that holds any (each
        shard read up to its last wanted sample; the others not at all): the few rows a
        features run's sheets show, not a whole run's."""
        import ray.data

        by_shard: dict[int, list[int]] = {}
        for row in sorted(set(row_ids.to_pylist())):
            by_shard.setdefault(split_sample_id(row)[0], []).append(row)
        items = [{"shard": shard, "wanted": rows} for shard, rows in sorted(by_shard.items())]
        if not items:
            raise MemscoreError(f"{self.source}: no rows asked for")
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _read_wanted_samples,
            fn_kwargs={"shards": list(self.files), "storage_options": self.storage_options},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=LIGHT_STAGE_CPUS,
        )

    def image_reading(self) -> dict[str, Any]:
        # a sample's image member travels in its row
        return {"path_column": self.path_column, "bytes_column": IMAGE, "confine_to": None}

    def rows_read(self, snapshot: Snapshot, counts_folder: str, *, output: str) -> RowsRead:
        """Each shard's sample count, as its read task recorded it (every shard was read to its
        end once the pipeline has finished), and the members left out."""
        dropped: dict[str, int] = {}
        counts = read_shard_counts(counts_folder, list(self.files), self.storage_options, dropped)
        unread = [url for url, n in zip(self.files, counts) if n is None]
        if unread:
            raise MemscoreError(
                f"{output}: {len(unread)} of {counted(len(counts), 'shard')} have no "
                f"recorded sample count (e.g. {unread[0]}), so the output cannot be checked; run "
                f"again with --resume"
            )
        return RowsRead(
            sum(counts),
            counts,
            {
                # what `memscore verify` checks a WebDataset output against
                "shards": [{"url": url, "samples": n} for url, n in zip(self.files, counts)],
                # members that first appeared after the samples that set the columns: samples each
                "members_left_out": dropped,
            },
        )

    def recorded_rows(
        self, output: str, *, summary: Mapping[str, Any] | None, counts_folder: str, by_name: bool
    ) -> list[int]:
        """The run's per-shard sample counts: its summary's ``shards`` (the same shards, in the
        same order, or by file name when ``by_name``), or for a run not finished the counts its
        read tasks recorded; reading every shard again here would cost what the run's read
        cost."""
        shards = list(self.files)
        if summary is not None:
            recorded = summary.get("shards")
            if recorded is None:
                raise MemscoreError(f"{output}: the run did not read WebDataset shards")
            urls = [item["url"] for item in recorded]
            if by_name:
                urls, shards = (
                    [u.rsplit("/", 1)[-1] for u in urls],
                    [u.rsplit("/", 1)[-1] for u in shards],
                )
            if urls != shards:
                raise MemscoreError(
                    f"{output}: the run read {len(urls)} shards, {self.source} names "
                    f"{len(shards)} (or others); give the shards the run was given"
                )
            return [int(item["samples"]) for item in recorded]
        counts = read_shard_counts(counts_folder, shards, self.storage_options)
        unread = sum(n is None for n in counts)
        if unread:
            raise MemscoreError(
                f"{output}: {unread} of {len(shards)} shards have not been read to their end "
                f"by the run yet, so their samples are not known; finish the run with --resume"
            )
        return counts

    def first_local_files(self, count: int, *, rows: int) -> list[str]:
        """The local shards: what every node's read tasks open."""
        return [p for p in self.files if local_path(p) and os.path.isfile(local_path(p))][:count]
