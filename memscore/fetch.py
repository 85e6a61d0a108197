"""Fetching a row's image bytes: path rules, hardened local reads, fsspec/S3 reads, and the
line between a transient failure and a row error.

A manifest row names its image by a path (local, ``file://`` or any fsspec URL such as
``s3://``), or, for a WebDataset sample, carries the bytes itself. ``RowFetcher.row_bytes`` turns
either into the image's bytes, the same way for every caller, so the decode stage
(``memscore.decode``) only ever sees bytes.

Why this is a module of its own: a failed read is one of two things, and the difference decides
whether a row's result is committed.

* A fact about the image (a missing file or object, a directory, permission denied on a local
  file, an empty or archived S3 object, too large, outside the input folder, an ``http://``
  path): an ``ImageDecodeError``, which becomes the row's ``memscore_error``, committed for good.
* Nothing about the image (the network, S3 5xx or throttling past the client's own retries,
  expired, revoked or missing credentials, EIO or ESTALE from a mounted filesystem, memory): a
  ``TransientError``, never committed. The decode task reads those rows again
  (``retry_transient``: exponential backoff from 1 s to 60 s, a new client each round, so
  rotated credentials are picked up) for up to ``transient_retry_s``; past that the task, and
  with it the run, fails with ``TransientFailure``, one line, and ``--resume`` reads the rows
  again once the cause is fixed.

``remote_read_error`` and ``local_read_error`` draw that line for remote and local reads.

Limits (each a row error):

* ``max_bytes``: a larger file is "too large"; it is never read whole (a local read stops at
  ``max_bytes + 1`` bytes, a remote one is a single ranged GET of as many).
* Only regular files are read: a folder, FIFO, socket or device is "not a file" (checked before
  the open and again on the open descriptor, which is opened non-blocking, so a path swapped for
  a FIFO in between cannot hang the read).
* ``confine_to`` (a local folder): local paths whose real path (symlinks resolved) lies outside it
  are "outside input folder" errors, and the file read is the checked real path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import stat
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from memscore.row_errors import MAX_DETAIL, ImageDecodeError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TRANSIENT_RETRY_S",
    "RETRYABLE_KINDS",
    "RowFetcher",
    "TransientError",
    "TransientFailure",
    "local_read_error",
    "remote_read_error",
    "resolve_path",
    "retry_transient",
]

DEFAULT_MAX_BYTES = 512 * 2**20

#: Error kinds ``--resume --retry-errors`` scores again: those an older memscore committed for
#: failures that may have said nothing about the image (a 5xx or dropped connection past the
#: client's retries was "unreadable", a MemoryError "decode failed"), and those that can change
#: (permission denied, an archived object restored).
RETRYABLE_KINDS = ("unreadable", "decode failed")

#: Seconds a decode task keeps retrying transient failures (``DecodeImages.transient_retry_s``).
DEFAULT_TRANSIENT_RETRY_S = 600.0
_FIRST_BACKOFF_S = 1.0
_MAX_BACKOFF_S = 60.0

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_LOCAL_PROTOCOLS = ("file", "local")
_UNSUPPORTED_PROTOCOLS = ("http", "https")


# ----------------------------------------------------------------------------------------- paths
def _protocol(path: str) -> str | None:
    """'s3' for 's3://b/k', 'simplecache::s3' style chains kept whole; None for plain paths."""
    match = _URL_RE.match(path)
    if match:
        return match.group(0)[:-3].lower()
    if "::" in path:  # fsspec chained URL, e.g. "simplecache::s3://b/k"
        return path.split("://", 1)[0].lower()
    return None


def _is_unsupported(protocol: str | None) -> bool:
    return protocol is not None and any(p in _UNSUPPORTED_PROTOCOLS for p in protocol.split("::"))


def resolve_path(path: str, base_dir: str | None) -> str:
    """Resolve a manifest path.

    Relative local paths resolve against ``base_dir`` (the manifest's folder, itself local or an
    ``s3://`` URL); absolute paths and URLs (``s3://``, ``gs://``, ``file://``) are returned
    unchanged. ``http://`` and ``https://`` raise ``ImageDecodeError('unsupported path', ...)``:
    the stage does not fetch web URLs.

    Args:
        path: the manifest's path value.
        base_dir: the folder relative paths resolve against; None or "": none (returned as is).

    Example:
        >>> resolve_path("cats/a.jpg", "s3://bucket/photos")
        's3://bucket/photos/cats/a.jpg'
        >>> resolve_path("s3://other/b.jpg", "s3://bucket/photos")
        's3://other/b.jpg'
        >>> resolve_path("https://example.com/c.jpg", None)
        Traceback (most recent call last):
        ...
        memscore.row_errors.ImageDecodeError: unsupported path: https:// URLs are not fetched; download the images first (https://example.com/c.jpg)
    """
    if not isinstance(path, str):
        raise ImageDecodeError("unsupported path", f"expected a string, got {type(path).__name__}")
    if not path.strip():
        raise ImageDecodeError("missing path", "the path is an empty string")
    protocol = _protocol(path)
    if _is_unsupported(protocol):
        raise ImageDecodeError(
            "unsupported path", f"{protocol}:// URLs are not fetched; download the images first ({path})"
        )
    if protocol is not None or os.path.isabs(path) or not base_dir:
        return path
    base_protocol = _protocol(base_dir)
    if base_protocol is None:
        resolved = os.path.join(base_dir, path)
    else:
        resolved = base_dir.rstrip("/") + "/" + path.lstrip("/")
    if _is_unsupported(base_protocol):
        raise ImageDecodeError(
            "unsupported path", f"{base_protocol}:// URLs are not fetched; download the images first ({resolved})"
        )
    return resolved


# ------------------------------------------------------------------- transient or a fact
#: Local errnos that describe the storage path rather than the file: network filesystems (NFS,
#: FUSE mounts of buckets, Lustre) report a failed backend as EIO, ESTALE, ETIMEDOUT ...; and a
#: process out of file descriptors or memory says nothing about the image either. A disk with
#: a bad sector also gives EIO: the run then stops naming the file, which is a disk to fix (or a
#: file to delete: a missing file is a row), not an image to null silently.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EIO", "ESTALE", "ETIMEDOUT", "ENOTCONN", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED",
        "EHOSTDOWN", "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH", "ENETRESET", "EAGAIN", "EINTR",
        "ENOMEM", "ENFILE", "EMFILE", "ENOBUFS", "EREMOTEIO", "ENOLINK", "ECOMM", "EBUSY")
    if hasattr(errno, name))

#: S3 error codes (from the botocore error s3fs chains as the cause) that are facts about the
#: object, though s3fs maps them to errors that are transient otherwise.
_S3_FACTS = {
    # memscore's one request is a ranged GET from byte 0; S3 answers 416 for a 0-byte object
    "InvalidRange": ("empty file", "0 bytes"),
    # archived (Glacier/Deep Archive) and not restored: --retry-errors reads it once restored
    "InvalidObjectState": ("unreadable", "archived object, not restored (InvalidObjectState)"),
    "KeyTooLongError": ("unsupported path", "key too long"),
    "InvalidURI": ("unsupported path", "invalid URI"),
    "InvalidBucketName": ("unsupported path", "invalid bucket name"),
}


class TransientError(Exception):
    """One row failed for a reason that says nothing about the image (internal to the stage)."""

    def __init__(self, path: str, cause: BaseException | str):
        self.path = path
        if isinstance(cause, BaseException):
            lines = str(cause).strip().splitlines()
            cause = f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        self.cause = " ".join(str(cause).split())[:MAX_DETAIL]
        super().__init__(f"{path}: {self.cause}")

    def __reduce__(self):
        return (type(self), (self.path, self.cause))


class TransientFailure(RuntimeError):
    """Raised by a decode task whose rows kept failing transiently past ``transient_retry_s``.

    It fails the task and so the run (``memscore.run.score`` reports it as one line); nothing of
    the task is committed, so ``--resume`` reads those rows again once the cause is fixed.
    ``str(exc)`` is one line naming the wait, an example path and its cause.
    """

    def __init__(self, message: str):
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.args[0],))


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code of the botocore ClientError in ``exc``'s cause chain, if any."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            return (response.get("Error") or {}).get("Code")
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def remote_read_error(exc: BaseException, path: str) -> ImageDecodeError | TransientError:
    """Classify an exception of a remote (fsspec) read: the row's error where it is a fact about
    the object, else a ``TransientError``.

    Facts: a missing object or bucket (``FileNotFoundError``), a "directory", and the S3 codes of
    ``_S3_FACTS`` (an empty object's 416, an archived object, an invalid key). Everything else is
    transient: connection errors and 5xx/throttling that outlasted the client's retries, 403s
    (s3fs maps AccessDenied, ExpiredToken, InvalidAccessKeyId ... to ``PermissionError``: expired
    or revoked credentials fail every row alike), botocore's ``NoCredentialsError`` (not even an
    OSError), timeouts, ``MemoryError``.

    Args:
        exc: what the read raised.
        path: the URL read, named in the error.

    Example:
        >>> str(remote_read_error(FileNotFoundError("no such key"), "s3://b/a.jpg"))
        'missing file: s3://b/a.jpg'
        >>> type(remote_read_error(PermissionError("Access Denied"), "s3://b/a.jpg")).__name__
        'TransientError'
    """
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return ImageDecodeError("missing file", path)
    if isinstance(exc, IsADirectoryError):
        return ImageDecodeError("not a file", f"is a directory: {path}")
    code = _s3_code(exc)
    fact = _S3_FACTS.get(code or "")
    if fact is not None:
        return ImageDecodeError(fact[0], f"{fact[1]}: {path}")
    error = TransientError(path, exc)
    if code and code not in error.cause:  # ExpiredToken says more than "Access Denied"
        error = TransientError(path, f"{error.cause} ({code})")
    return error


def local_read_error(exc: OSError, shown: str) -> ImageDecodeError | TransientError:
    """Classify an OSError from stat/open/read of a local path: the row's error (missing,
    permission denied, a directory ...) or a ``TransientError`` (``_TRANSIENT_ERRNOS``).

    Args:
        exc: what stat, open or read raised.
        shown: the path as the manifest gave it, named in the error.

    Example:
        >>> str(local_read_error(PermissionError(13, "Permission denied"), "/data/a.jpg"))
        'unreadable: permission denied: /data/a.jpg'
        >>> isinstance(local_read_error(OSError(errno.ESTALE, "Stale file handle"), "/data/a.jpg"),
        ...            TransientError)  # a mount whose backend failed: read again
        True
    """
    if isinstance(exc, FileNotFoundError):
        return ImageDecodeError("missing file", shown)
    if isinstance(exc, NotADirectoryError):
        return ImageDecodeError("missing file", f"a parent is not a directory: {shown}")
    if isinstance(exc, PermissionError):
        return ImageDecodeError("unreadable", f"permission denied: {shown}")
    if isinstance(exc, IsADirectoryError):
        return ImageDecodeError("not a file", f"is a directory: {shown}")
    if exc.errno in _TRANSIENT_ERRNOS:
        return TransientError(shown, exc)
    return ImageDecodeError("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}: {shown}")


# ---------------------------------------------------------------------------------------- reading
class RowFetcher:
    """A row's image bytes, from its path (local or any fsspec URL) or, with ``bytes_given``,
    the row's own bytes; every failure an ``ImageDecodeError`` (a fact) or a ``TransientError``.

    Pickles without its fsspec filesystems (built lazily, cached per protocol), so a stage holding
    it ships to Ray workers without s3fs objects.

    Args:
        base_dir: folder that relative paths resolve against (local or a URL such as ``s3://b/p``).
        storage_options: keyword arguments for ``fsspec.core.url_to_fs`` (e.g. S3 credentials);
            ``memscore.storage``'s S3 defaults (retries with backoff) apply under them.
        max_bytes: files larger than this are "too large" errors (never read whole).
        confine_to: a local folder; local paths whose real path lies outside it are "outside
            input folder" errors. Remote URLs are not affected.
        bytes_given: each row's item is its image's bytes (a WebDataset sample's image member),
            checked for size and presence but not read; None is a "no image" error.

    Example:
        >>> fetcher = RowFetcher(base_dir="examples/images")
        >>> fetcher.row_bytes("chelsea.png")[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
        >>> fetcher.row_bytes("nowhere.jpg")
        Traceback (most recent call last):
        ...
        memscore.row_errors.ImageDecodeError: missing file: examples/images/nowhere.jpg
    """

    def __init__(
        self,
        *,
        base_dir: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        confine_to: str | None = None,
        bytes_given: bool = False,
    ):
        if confine_to is not None and _protocol(str(confine_to)) not in (None, *_LOCAL_PROTOCOLS):
            raise ValueError(f"confine_to must be a local folder, got {confine_to!r}")
        self.base_dir = base_dir
        self.storage_options = dict(storage_options or {})
        self.max_bytes = int(max_bytes)
        self.confine_to = None if confine_to is None else str(confine_to)
        self.bytes_given = bool(bytes_given)
        self._fresh_clients = False
        # Filesystems are built lazily and never pickled; the lock is recreated on unpickling.
        self._filesystems: dict[str, Any] = {}
        self._fs_lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_filesystems"] = {}
        del state["_fs_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fs_lock = threading.Lock()

    # ------------------------------------------------------------------------------- clients
    def _filesystem(self, path: str, protocol: str):
        """(fsspec filesystem, path inside it), the filesystem cached per protocol."""
        from memscore import storage  # its S3 defaults (retries with backoff) apply here too

        if "::" in protocol:  # chained URLs (e.g. simplecache::s3://) carry per-URL options
            return storage.url_to_fs(path, self.storage_options)
        if self._fresh_clients:  # retrying: a new client, which looks up credentials again
            with self._fs_lock:
                fs = self._filesystems.get(protocol)
                if fs is None:
                    fs, inner = storage.url_to_fs(
                        path, {**self.storage_options, "skip_instance_cache": True})
                    self._filesystems[protocol] = fs
                    return fs, inner
            return fs, fs._strip_protocol(path)
        with self._fs_lock:
            fs = self._filesystems.get(protocol)
            if fs is None:
                fs, inner = storage.url_to_fs(path, self.storage_options)
                self._filesystems[protocol] = fs
                return fs, inner
        return fs, fs._strip_protocol(path)

    def drop_clients(self) -> None:
        """Forget the cached filesystems: the next read builds its client again."""
        with self._fs_lock:
            self._filesystems.clear()

    @contextlib.contextmanager
    def fresh_clients(self) -> Iterator[None]:
        """While retrying: filesystems are built past fsspec's instance cache, so each new client
        looks credentials up again (rotated credentials, a replaced endpoint); dropped on exit."""
        self._fresh_clients = True
        try:
            yield
        finally:
            self._fresh_clients = False
            self.drop_clients()

    # --------------------------------------------------------------------------------- local
    def _confined(self, path: str) -> str:
        """-> the real path of local ``path``, if inside ``confine_to``; else "outside input folder"."""
        from fsspec.implementations.local import LocalFileSystem

        root = os.path.realpath(LocalFileSystem._strip_protocol(self.confine_to))
        real = os.path.realpath(path)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            raise ImageDecodeError("outside input folder", f"{path} resolves to {real}, outside {root}")
        return real

    def _read_local(self, path: str) -> bytes:
        shown = path  # error messages name the path as given
        if self.confine_to is not None:
            path = self._confined(path)  # read what was checked, not the symlink again
        try:
            st = os.stat(path)
        except OSError as exc:
            raise local_read_error(exc, shown) from None
        self._check_regular(st.st_mode, shown)
        self._check_size(st.st_size, shown)
        try:
            # O_NONBLOCK: if the path was swapped for a FIFO since the stat, open must not hang;
            # the fstat below then refuses it. No effect on regular files.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise local_read_error(exc, shown) from None
        with os.fdopen(fd, "rb") as f:
            self._check_regular(os.fstat(fd).st_mode, shown)
            try:
                data = f.read(self.max_bytes + 1)
            except OSError as exc:
                raise local_read_error(exc, shown) from None
        return data

    @staticmethod
    def _check_regular(mode: int, path: str) -> None:
        if stat.S_ISREG(mode):
            return
        if stat.S_ISDIR(mode):
            what = "is a directory"
        elif stat.S_ISFIFO(mode):
            what = "is a FIFO (named pipe)"
        elif stat.S_ISSOCK(mode):
            what = "is a socket"
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            what = "is a device"
        else:
            what = "is not a regular file"
        raise ImageDecodeError("not a file", f"{what}: {path}")

    def _check_size(self, size: int | None, path: str) -> None:
        if size is not None and size > self.max_bytes:
            raise ImageDecodeError("too large", f"{size} bytes > max_bytes {self.max_bytes}: {path}")

    # -------------------------------------------------------------------------------- remote
    def _read_remote(self, path: str, protocol: str) -> bytes:
        """One ranged GET of at most ``max_bytes + 1`` bytes: no HEAD first (``fs.open`` asks
        for the size with one), which would double the request cost and halve the request
        rate S3 allows per prefix. A longer object shows as more than ``max_bytes``."""
        fs, inner = self._filesystem(path, protocol)
        try:
            return fs.cat_file(inner, start=0, end=self.max_bytes + 1)
        except Exception as exc:  # NoCredentialsError is no OSError: classify everything
            raise remote_read_error(exc, path) from None

    # ------------------------------------------------------------------------------- per row
    def read_bytes(self, path: str) -> bytes:
        """The bytes of the file at ``path`` (already resolved: local, ``file://`` or a URL).

        Raises:
            ImageDecodeError: a fact about the file ("missing file", "not a file", "unreadable",
                "too large", "empty file", "outside input folder", ...).
            TransientError: a failure that says nothing about the file.
        """
        protocol = _protocol(path)
        if protocol is None or protocol in _LOCAL_PROTOCOLS:
            if protocol is not None:
                from fsspec.implementations.local import LocalFileSystem

                path = LocalFileSystem._strip_protocol(path)
            data = self._read_local(path)
        else:
            data = self._read_remote(path, protocol)
        if len(data) > self.max_bytes:
            raise ImageDecodeError("too large", f"more than max_bytes {self.max_bytes} bytes: {path}")
        if not data:
            raise ImageDecodeError("empty file", f"0 bytes: {path}")
        return data

    def row_bytes(self, item: Any) -> bytes:
        """A row's image bytes: read from its path (resolved against ``base_dir``), or
        (``bytes_given``) the item itself.

        Raises:
            ImageDecodeError, TransientError: as ``read_bytes``; also "missing path" (a null or
                empty path), "unsupported path" (``resolve_path``) and "no image".
        """
        if self.bytes_given:
            if item is None:
                raise ImageDecodeError("no image", "the sample has no image member")
            if len(item) > self.max_bytes:
                raise ImageDecodeError("too large",
                                       f"{len(item)} bytes > max_bytes {self.max_bytes}")
            if not item:
                raise ImageDecodeError("empty file", "0 bytes")
            return item
        if item is None:
            raise ImageDecodeError("missing path", "the path column is null")
        return self.read_bytes(resolve_path(item, self.base_dir))


# ---------------------------------------------------------------------------------------- retries
def retry_transient(
    waiting: Mapping[int, TransientError],
    read_again: Callable[[list[int]], Mapping[int, TransientError]],
    *,
    fetcher: RowFetcher,
    retry_s: float,
    rows: int,
) -> None:
    """Read the rows that failed transiently again, with exponential backoff (1 s doubling to
    60 s, jittered), until they succeed or become facts; past ``retry_s`` of waiting raise
    ``TransientFailure``, which fails the task.

    Each round builds ``fetcher``'s clients anew (``RowFetcher.fresh_clients``).

    Args:
        waiting: row index -> its transient error, for the rows to read again.
        read_again: reads (and decodes) the rows at the given indices again, and returns the
            ones that failed transiently again, index -> error.
        fetcher: the ``RowFetcher`` that ``read_again`` reads through.
        retry_s: seconds of waiting before giving up (``DecodeImages.transient_retry_s``).
        rows: the rows of the task, named in the failure.
    """
    if not waiting:
        return
    started = time.monotonic()
    delay = _FIRST_BACKOFF_S
    with fetcher.fresh_clients():  # rotated credentials, a replaced endpoint: a new client
        while waiting:
            waited = time.monotonic() - started
            if waited >= retry_s:
                example = next(iter(waiting.values()))
                raise TransientFailure(
                    f"reading images failed for {waited:.0f} s after retries "
                    f"(--transient-retry-s {retry_s:g}), {len(waiting)} of "
                    f"{rows} rows of a decode task: {example}")
            time.sleep(min(delay * random.uniform(0.5, 1.0), max(0.0, retry_s - waited)))
            delay = min(2 * delay, _MAX_BACKOFF_S)
            fetcher.drop_clients()
            waiting = read_again(list(waiting))
