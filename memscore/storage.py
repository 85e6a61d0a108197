"""Filesystems: one fsspec configuration for every read and write, local or ``s3://``.

The image reads (fsspec), Ray Data's manifest readers and its Parquet writer (pyarrow
filesystems) must see the same endpoint and credentials, so the pyarrow filesystem handed to
Ray is the fsspec one wrapped in ``FSSpecHandler``. With no storage options, s3fs (through
botocore) takes the endpoint, region and credentials from the standard AWS environment
variables (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` ...).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Mapping

import fsspec

__all__ = [
    "is_url",
    "absolute",
    "url_to_fs",
    "pyarrow_filesystem",
    "for_pyarrow",
    "pyarrow_filesystem_of",
    "join",
    "parent",
    "parse_storage_options",
    "redact",
    "write_atomic",
    "pipe_atomic",
]

# The S3 client retries transient failures (throttling, 5xx, dropped connections) itself with
# exponential backoff. "standard" rather than "adaptive": adaptive (experimental in botocore)
# stalls the whole client for seconds after one SlowDown (measured: 10 PUTs with 9 injected
# faults took 18 s adaptive, 5-8 s standard). s3fs passes `config_kwargs` to botocore.
_S3_DEFAULTS = {"config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}}}


def is_url(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded, against the current folder); URLs unchanged.

    Configs fix their paths when they are made: Ray's readers, writers and checkpointing take
    a path without a scheme as relative to nothing (pyarrow: "URI has empty scheme"), and a
    worker's current folder is not the user's.
    """
    if is_url(path):
        return path
    import os

    return os.path.abspath(os.path.expanduser(path))


def _protocol(path: str) -> str:
    return path.split("://", 1)[0] if is_url(path) else "file"


def url_to_fs(path: str, storage_options: Mapping[str, Any] | None = None):
    """(fsspec filesystem, path inside it) for a local path or URL."""
    options = dict(storage_options or {})
    if _protocol(path) in ("s3", "s3a"):
        options = {**_S3_DEFAULTS, **options}
    return fsspec.core.url_to_fs(path, **options)


def pyarrow_filesystem(path: str, storage_options: Mapping[str, Any] | None = None):
    """The pyarrow filesystem Ray Data should use for ``path``, or None for local paths.

    Local paths are left to Ray (None), which resolves them itself on each node.
    """
    if not is_url(path) or _protocol(path) == "file":
        return None
    fs, _ = url_to_fs(path, storage_options)
    return pyarrow_filesystem_of(fs)


def pyarrow_filesystem_of(fs):
    """An fsspec filesystem wrapped for pyarrow (and Ray): the one place this is done."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def for_pyarrow(paths: str | list[str], storage_options: Mapping[str, Any] | None = None):
    """(path or paths, filesystem) as Ray Data's readers and writers take them.

    With an explicit pyarrow filesystem Ray wants the paths inside it (``bucket/key``); local
    paths keep their form and no filesystem. A list shares one filesystem, its first path's.
    """
    many = not isinstance(paths, str)
    items = list(paths) if many else [paths]
    filesystem = pyarrow_filesystem(items[0], storage_options)
    if filesystem is not None:
        items = [p.split("://", 1)[1] for p in items]
    return (items if many else items[0]), filesystem


def join(base: str, *parts: str) -> str:
    """Join path parts, keeping a URL's scheme intact."""
    if is_url(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    import os

    return os.path.join(base, *parts)


def parent(path: str) -> str:
    if is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    import os

    return os.path.dirname(os.path.abspath(path))


def write_atomic(path: str, data: bytes,
                 storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to ``path`` (local or URL) whole or not at all: a reader sees the old
    file or the new one, never a file cut short by a full disk or a kill (``pipe_atomic``).

    Example:
        >>> import os, tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "state.json")
        >>> write_atomic(target, b'{"rows": 5}')
        >>> open(target, "rb").read(), sorted(os.listdir(os.path.dirname(target)))
        (b'{"rows": 5}', ['state.json'])
    """
    fs, inner = url_to_fs(path, storage_options)
    pipe_atomic(fs, inner, data)


def pipe_atomic(fs, path: str, data: bytes) -> None:
    """``fs.pipe_file(path, data)``, made atomic where the filesystem is not already.

    Locally: written beside the target as ``<name>.tmp-<random>``, flushed to disk, then
    renamed over it (``os.replace``, atomic on one filesystem); on failure (a full disk) the
    temporary file is removed and the old file, if any, is left as it was. On an object store
    one PUT (s3fs's ``pipe_file``: a single ``PutObject``, or a multipart upload above its
    block size) creates the object whole when it succeeds, and nothing when it fails.
    """
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    import os
    import uuid

    path = LocalFileSystem._strip_protocol(path)
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f"{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    try:  # the rename reaches the disk with the folder's entry
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """``["endpoint_url=http://h:9000", "client_kwargs.region_name=us-east-1"]`` -> nested dict.

    Values are parsed as JSON where they parse (``anon=true`` -> True), else kept as strings.
    """
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"storage option {item!r} is not KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = options
        *outer, last = key.split(".")
        for name in outer:
            node = node.setdefault(name, {})
        node[last] = value
    return options


_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "session")


def redact(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of storage options safe to log or record: secret-looking values replaced."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out[key] = redact(value)
        elif any(word in key.lower() for word in _SECRET_WORDS):
            out[key] = "***"
        else:
            out[key] = value
    return out
