"""Fetching a row's image bytes: path rules, hardened local reads, fsspec/S3 reads, and the
line between a transient failure and a row error.

A manifest row names its image by a path (local, ``file://`` or any fsspec URL such as
``s3://``), or, for a WebDataset sample, carries the bytes itself. ``RowFetcher.row_bytes`` turns
either into the image's bytes, the same way for every caller, so the decode stage
(``memscore.stages.decode``) only ever sees bytes.

Why this is a module of its own: a failed read is one of two things, and the difference decides
whether a row's result is committed.

* A fact about the image (a missing file or object, a directory, permission denied on a local
  file, an empty or archived S3 object, too large, outside the input folder, an ``http://``
  path): an ``ImageDecodeError``, which becomes the row's ``memscore_error``, committed for good.
* Nothing about the image (the network, S3 5xx or throttling, expired, revoked or missing
  credentials, EIO or ESTALE from a mounted filesystem, memory): a ``TransientError``, never
  committed. The decode task reads those rows again (``retry_transient``: exponential backoff
  from 1 s to 60 s, a new client each round, so rotated credentials are picked up) until its
  reads have failed for ``transient_retry_s`` with none getting through (``RetryClock``); then
  the task, and with it the run, fails with ``TransientFailure``, one line, and ``--resume``
  reads the rows again once the cause is fixed. memscore's loop is the only retry layer of an
  S3 image read: the client makes one HTTP request per read, bounded by its connect and read
  timeouts (``storage.bounded_url_to_fs``), so a task gives up at most one request's timeout
  after its clock has run out, whatever the outage.

A third outcome is no row's: a storage client configured wrong (an endpoint URL that is not
one or carries ``user:pass@``, an invalid region, an unknown profile, options botocore
rejects) fails every read alike, at once and for ever. The task fails at once with
``StorageConfigError``, one line naming the cause; nothing is retried.

``remote_read_error`` and ``local_read_error`` draw those lines for remote and local reads.

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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from memscore.row_errors import MAX_DETAIL, ImageDecodeError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TRANSIENT_RETRY_S",
    "RETRYABLE_KINDS",
    "RetryClock",
    "RowFetcher",
    "StorageConfigError",
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

#: Seconds a decode task's reads may keep failing transiently, none getting through, before
#: it gives up (``DecodeImages.transient_retry_s``, ``RetryClock``).
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
            "unsupported path",
            f"{protocol}:// URLs are not fetched; download the images first ({path})",
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
            "unsupported path",
            f"{base_protocol}:// URLs are not fetched; download the images first ({resolved})",
        )
    return resolved


# ------------------------------------------------------------------- transient or a fact
#: Local errnos that describe the storage path rather than the file: network filesystems (NFS,
#: FUSE mounts of buckets, Lustre) report a failed backend as EIO, ESTALE, ETIMEDOUT ...; and a
#: process out of file descriptors or memory says nothing about the image either. A disk with
#: a bad sector also gives EIO: the run then stops naming the file, which is a disk to fix (or a
#: file to delete: a missing file is a row), not an image to null silently.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO",
        "ESTALE",
        "ETIMEDOUT",
        "ENOTCONN",
        "ECONNRESET",
        "ECONNABORTED",
        "ECONNREFUSED",
        "EHOSTDOWN",
        "EHOSTUNREACH",
        "ENETDOWN",
        "ENETUNREACH",
        "ENETRESET",
        "EAGAIN",
        "EINTR",
        "ENOMEM",
        "ENFILE",
        "EMFILE",
        "ENOBUFS",
        "EREMOTEIO",
        "ENOLINK",
        "ECOMM",
        "EBUSY",
    )
    if hasattr(errno, name)
)

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


#: botocore's errors of a client configured wrong (matched by class name: botocore is not
#: imported here). No request of that client can succeed, so none is worth waiting for.
#: Measured (botocore 1.43, s3fs 2026.9, moto 5.2): ``Invalid endpoint`` is a ValueError, a
#: port out of range or an ``ftp://`` endpoint an EndpointResolutionError, a bad region an
#: InvalidRegionError, an unknown ``config_kwargs`` key a TypeError, a bad retry mode an
#: InvalidRetryModeError, a key without a secret a PartialCredentialsError, all raised before
#: any request. NoCredentialsError is not here: credentials that appear later (a rotated
#: file, an instance role that answers again) end it, so it is transient.
_CLIENT_CONFIG_ERRORS = frozenset(
    {
        "ParamValidationError",
        "NoRegionError",
        "InvalidRegionError",
        "UnknownRegionError",
        "EndpointResolutionError",
        "InvalidEndpointConfigurationError",
        "UnknownFIPSEndpointError",
        "UnknownEndpointResolutionBuiltInName",
        "InvalidConfigError",
        "InvalidDefaultsMode",
        "InvalidRetryModeError",
        "InvalidRetryConfigurationError",
        "InvalidMaxRetryAttemptsError",
        "InvalidS3AddressingStyleError",
        "InvalidS3UsEast1RegionalEndpointConfigError",
        "InvalidProxiesConfigError",
        "InvalidChecksumConfigError",
        "InvalidIMDSEndpointError",
        "InvalidIMDSEndpointModeError",
        "InvalidEndpointDiscoveryConfigurationError",
        "UnknownSignatureVersionError",
        "UnsupportedSignatureVersionError",
        "UnsupportedS3ConfigurationError",
        "UnsupportedS3AccesspointConfigurationError",
        "PartialCredentialsError",
        "ProfileNotFound",
        "UnknownCredentialError",
        "ConfigParseError",
        "UnknownServiceError",
        "UnknownClientMethodError",
        "MissingDependencyException",
    }
)
#: Words of a botocore validation or endpoint error about the request's bucket or key, that
#: is the row's path (``s3://bucket`` without a key, an invalid bucket name or ARN): a fact.
_PATH_WORDS = re.compile(
    r"parameter Key|parameter Bucket|bucket name|\bARN\b|access ?point", re.IGNORECASE
)


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

    It fails the task and so the run (``memscore.scoring.job.score`` reports it as one line); nothing of
    the task is committed, so ``--resume`` reads those rows again once the cause is fixed.
    ``str(exc)`` is one line naming the wait, an example path and its cause.
    """

    def __init__(self, message: str):
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.args[0],))


class StorageConfigError(RuntimeError):
    """Raised by a decode task whose storage client is configured wrong, at its first read:
    no read of it can succeed, so nothing is retried (``remote_read_error``).

    It fails the task and so the run; nothing of the task is committed, and ``--resume``
    continues once the storage options (or the AWS_* variables) are fixed. ``str(exc)`` is one
    line: "the storage client is configured wrong, so no image can be read (not retried):
    <path>: <cause>"; it never shows a password (``storage.check_s3_options``).
    """

    def __init__(self, message: str):
        super().__init__(message)

    @classmethod
    def reading(cls, path: str, cause: BaseException | str) -> StorageConfigError:
        return cls(
            f"the storage client is configured wrong, so no image can be read "
            f"(not retried): {path}: {_one_line(cause)}"
        )

    def __reduce__(self):
        return (type(self), (self.args[0],))


def _one_line(cause: BaseException | str) -> str:
    """``Class: message`` on one line (botocore's validation errors span several)."""
    if isinstance(cause, BaseException):
        cause = f"{type(cause).__name__}: {' '.join(str(cause).split())}".rstrip(": ")
    return cause[:MAX_DETAIL]


def _botocore_names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__ if c.__module__.startswith("botocore.")}


def _is_config_error(exc: BaseException) -> bool:
    """Whether ``exc``, raised by an S3 read, says the client is configured wrong.

    botocore's configuration errors (``_CLIENT_CONFIG_ERRORS``), memscore's own check of the
    options (``storage.StorageOptionsError``), and ValueError or TypeError raised while the
    client is made or a request built, also where botocore wraps one in ``HTTPClientError``:
    aiohttp's "Cannot combine AUTHORIZATION header with AUTH argument or credentials encoded in
    URL" for an endpoint with ``user:pass@``, which botocore and s3fs otherwise retry for 10
    minutes. A UnicodeError is the path's (a key that is not text), not the client's.
    """
    if _botocore_names(exc) & _CLIENT_CONFIG_ERRORS:
        return True
    if "HTTPClientError" in _botocore_names(exc):
        inner = getattr(exc, "kwargs", {}).get("error") or exc.__cause__ or exc.__context__
        return inner is not None and _is_client_side(inner)
    return _is_client_side(exc)


def _is_client_side(exc: BaseException) -> bool:
    if isinstance(exc, UnicodeError) or not isinstance(exc, (ValueError, TypeError)):
        return False
    # s3fs's note on an aiobotocore internal error it could not unwrap: no configuration's
    return "'coroutine'" not in str(exc)


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code of the botocore ClientError in ``exc``'s cause chain, if any."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            return (response.get("Error") or {}).get("Code")
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def remote_read_error(
    exc: BaseException, path: str
) -> ImageDecodeError | TransientError | StorageConfigError:
    """Classify an exception of a remote (fsspec) read: the row's error where it is a fact about
    the object, a ``StorageConfigError`` where the client is configured wrong, else a
    ``TransientError``.

    Facts: a missing object or bucket (``FileNotFoundError``), a "directory", the S3 codes of
    ``_S3_FACTS`` (an empty object's 416, an archived object, an invalid key), and a path the
    client cannot ask for (no key, an invalid bucket name, a key that is not text). Client
    configuration (``_is_config_error``): an endpoint URL that is not one or carries
    credentials, an invalid region, an unknown profile, options botocore rejects. Everything
    else is transient: refused or dropped connections, timeouts, DNS failures, 5xx and
    throttling, 403s (s3fs maps AccessDenied, ExpiredToken, InvalidAccessKeyId ... to
    ``PermissionError``: expired or revoked credentials fail every row alike), botocore's
    ``NoCredentialsError`` (not even an OSError), ``MemoryError``.

    Args:
        exc: what the read raised.
        path: the URL read, named in the error.

    Example:
        >>> str(remote_read_error(FileNotFoundError("no such key"), "s3://b/a.jpg"))
        'missing file: s3://b/a.jpg'
        >>> type(remote_read_error(PermissionError("Access Denied"), "s3://b/a.jpg")).__name__
        'TransientError'
        >>> str(remote_read_error(ValueError("Invalid endpoint: 127.0.0.1:9000"), "s3://b/a.jpg"))
        'the storage client is configured wrong, so no image can be read (not retried): s3://b/a.jpg: ValueError: Invalid endpoint: 127.0.0.1:9000'
    """
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return ImageDecodeError("missing file", path)
    if isinstance(exc, IsADirectoryError):
        return ImageDecodeError("not a file", f"is a directory: {path}")
    if isinstance(exc, UnicodeError):
        return ImageDecodeError("unsupported path", f"{_one_line(exc)}: {path}")
    if _botocore_names(exc) & {
        "ParamValidationError",
        "EndpointProviderError",
    } and _PATH_WORDS.search(str(exc)):
        return ImageDecodeError("unsupported path", f"{_one_line(exc)}: {path}")
    if _is_config_error(exc):
        return StorageConfigError.reading(path, exc)
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
        storage_options: keyword arguments for ``fsspec.core.url_to_fs`` (e.g. S3 credentials).
            An S3 client makes one request per read, bounded by its connect and read timeouts
            (``storage.bounded_url_to_fs``): the retries are ``retry_transient``'s.
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
        from memscore import storage

        if "::" in protocol:  # chained URLs (e.g. simplecache::s3://) carry per-URL options
            return storage.url_to_fs(path, self.storage_options)
        if self._fresh_clients:  # retrying: a new client, which looks up credentials again
            with self._fs_lock:
                fs = self._filesystems.get(protocol)
                if fs is None:
                    fs, inner = storage.bounded_url_to_fs(
                        path, {**self.storage_options, "skip_instance_cache": True}
                    )
                    self._filesystems[protocol] = fs
                    return fs, inner
            return fs, fs._strip_protocol(path)
        with self._fs_lock:
            fs = self._filesystems.get(protocol)
            if fs is None:
                fs, inner = storage.bounded_url_to_fs(path, self.storage_options)
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
            raise ImageDecodeError(
                "outside input folder", f"{path} resolves to {real}, outside {root}"
            )
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
            fd = os.open(
                path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
            )
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
            raise ImageDecodeError(
                "too large", f"{size} bytes > max_bytes {self.max_bytes}: {path}"
            )

    # -------------------------------------------------------------------------------- remote
    def _read_remote(self, path: str, protocol: str) -> bytes:
        """One ranged GET of at most ``max_bytes + 1`` bytes: no HEAD first (``fs.open`` asks
        for the size with one), which would double the request cost and halve the request
        rate S3 allows per prefix. A longer object shows as more than ``max_bytes``."""
        from memscore.storage import StorageOptionsError

        try:
            fs, inner = self._filesystem(path, protocol)
        except StorageOptionsError as exc:  # options no client can work with
            raise StorageConfigError.reading(path, exc) from None
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
            StorageConfigError: the storage client is configured wrong (no read can succeed).
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
            raise ImageDecodeError(
                "too large", f"more than max_bytes {self.max_bytes} bytes: {path}"
            )
        if not data:
            raise ImageDecodeError("empty file", f"0 bytes: {path}")
        return data

    def row_bytes(self, item: Any) -> bytes:
        """A row's image bytes: read from its path (resolved against ``base_dir``), or
        (``bytes_given``) the item itself.

        Raises:
            ImageDecodeError, TransientError, StorageConfigError: as ``read_bytes``; also
                "missing path" (a null or empty path), "unsupported path" (``resolve_path``)
                and "no image".
        """
        if self.bytes_given:
            if item is None:
                raise ImageDecodeError("no image", "the sample has no image member")
            if len(item) > self.max_bytes:
                raise ImageDecodeError(
                    "too large", f"{len(item)} bytes > max_bytes {self.max_bytes}"
                )
            if not item:
                raise ImageDecodeError("empty file", "0 bytes")
            return item
        if item is None:
            raise ImageDecodeError("missing path", "the path column is null")
        return self.read_bytes(resolve_path(item, self.base_dir))


# ---------------------------------------------------------------------------------------- retries
class RetryClock:
    """How long the reads of one decode task have been failing, and whether it has given up.

    The clock starts at the task's first transient failure and starts again at each read that
    gets through after it (the image, or a fact about it): it measures how long reads have
    kept failing with none getting through, so a task whose other rows still read and decode
    (slowly, for minutes) is never stopped by one early failure. Once it has run ``retry_s``
    and a read fails again, the task gives up (``stopped``); so does a client configuration
    error (``stop``), at once. Reads are asked ``stopped`` before they start, within a round
    too, so a task of 256 rows against a dead endpoint gives up after ``retry_s`` plus the one
    request in flight, not plus 256 timeouts; ``retry_transient`` then raises.

    Thread-safe: the rows of a round are read in threads.

    Args:
        retry_s: seconds reads may keep failing (``DecodeImages.transient_retry_s``).
        now: the time source (seconds, monotonic).

    Example:
        >>> ticks = iter([0.0, 1.0, 5.0, 6.0, 9.0])
        >>> clock = RetryClock(3, now=lambda: next(ticks))
        >>> clock.failed(TransientError("s3://b/a.jpg", "EndpointConnectionError")); clock.stopped
        False
        >>> clock.got_through()  # t=1: a read got through, the clock starts again
        >>> clock.failed(TransientError("s3://b/a.jpg", "EndpointConnectionError")); clock.stopped
        True
    """

    def __init__(self, retry_s: float, *, now: Callable[[], float] = time.monotonic):
        if not retry_s >= 0:
            raise ValueError(f"retry_s must be >= 0, got {retry_s}")
        self.retry_s = float(retry_s)
        self._now = now
        self._lock = threading.Lock()
        self._since: float | None = None  # the start of the current run of failures
        self.stopped = False
        #: the last transient failure, named when the task gives up
        self.example: TransientError | None = None

    def failed(self, error: TransientError) -> None:
        """A read failed transiently: start the clock, or give up if it has run out."""
        with self._lock:
            now = self._now()
            self.example = error
            if self._since is None:
                self._since = now
            if now - self._since >= self.retry_s:
                self.stopped = True

    def got_through(self) -> None:
        """A read got an answer (the image, or a fact about it): the clock starts again."""
        with self._lock:
            if self._since is not None and not self.stopped:
                self._since = self._now()

    def stop(self) -> None:
        """Give up now (a client configuration error: no read can succeed)."""
        self.stopped = True

    def waited(self) -> float:
        """Seconds since the current run of failures began (0 before any)."""
        with self._lock:
            return 0.0 if self._since is None else max(0.0, self._now() - self._since)

    def remaining(self) -> float:
        """Seconds until the clock runs out (``retry_s`` before any failure)."""
        return max(0.0, self.retry_s - self.waited())

    def not_read(self, row: str) -> TransientError:
        """The error of a row not read because the task gave up (never an example)."""
        return TransientError(row, "not read: the decode task gave up")


def retry_transient(
    waiting: Mapping[int, TransientError],
    read_again: Callable[[list[int]], Mapping[int, TransientError]],
    *,
    fetcher: RowFetcher,
    clock: RetryClock,
    rows: int,
) -> None:
    """Read the rows that failed transiently again, with exponential backoff (1 s doubling to
    60 s, jittered), until they succeed or become facts; once ``clock`` has given up (its
    reads failed for ``clock.retry_s`` with none getting through) raise ``TransientFailure``,
    which fails the task.

    The backoff never sleeps past the clock's end, so the last round reads at the deadline;
    within a round, reads not yet started when the clock gives up are not started (``read_again``
    asks ``clock.stopped``). Each round builds ``fetcher``'s clients anew
    (``RowFetcher.fresh_clients``).

    Args:
        waiting: row index -> its transient error, for the rows to read again.
        read_again: reads (and decodes) the rows at the given indices again, reporting each
            read to ``clock``, and returns the ones that failed transiently again, index ->
            error.
        fetcher: the ``RowFetcher`` that ``read_again`` reads through.
        clock: the task's ``RetryClock``, which its first reads ran under too.
        rows: the rows of the task, named in the failure.
    """
    if not waiting:
        return
    delay = _FIRST_BACKOFF_S
    with fetcher.fresh_clients():  # rotated credentials, a replaced endpoint: a new client
        while waiting:
            if clock.stopped:
                example = clock.example or next(iter(waiting.values()))
                raise TransientFailure(
                    f"reading images failed for {clock.waited():.0f} s after retries "
                    f"(--transient-retry-s {clock.retry_s:g}), {len(waiting)} of "
                    f"{rows} rows of a decode task: {example}"
                )
            time.sleep(min(delay * random.uniform(0.5, 1.0), clock.remaining()))
            delay = min(2 * delay, _MAX_BACKOFF_S)
            fetcher.drop_clients()
            waiting = read_again(list(waiting))
