"""Filesystems: one fsspec configuration for every read and write, local or ``s3://``.

The image reads (fsspec), Ray Data's manifest readers and its Parquet writer (pyarrow
filesystems) must see the same endpoint and credentials, so the pyarrow filesystem handed to
Ray is the fsspec one wrapped in ``FSSpecHandler``. With no storage options, s3fs (through
botocore) takes the endpoint, region and credentials from the standard AWS environment
variables (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` ...).
"""

from __future__ import annotations

import copy
import json
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec

__all__ = [
    "is_url",
    "absolute",
    "url_to_fs",
    "bounded_url_to_fs",
    "check_s3_options",
    "StorageOptionsError",
    "S3_CONNECT_TIMEOUT_S",
    "S3_READ_TIMEOUT_S",
    "pyarrow_filesystem",
    "for_pyarrow",
    "pyarrow_filesystem_of",
    "join",
    "parent",
    "parse_storage_options",
    "redact",
    "write_atomic",
    "write_under",
    "pipe_atomic",
]

# The S3 client retries transient failures (throttling, 5xx, dropped connections) itself with
# exponential backoff. "standard" rather than "adaptive": adaptive (experimental in botocore)
# stalls the whole client for seconds after one SlowDown (measured: 10 PUTs with 9 injected
# faults took 18 s adaptive, 5-8 s standard). s3fs passes `config_kwargs` to botocore.
_S3_DEFAULTS = {"config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}}}

#: The bounds of one S3 request of ``bounded_url_to_fs``'s clients, where the storage options
#: set none: s3fs's own defaults, written out because memscore's deadline is stated in them.
#: A refused connection fails at once; a host that drops the connection attempt fails after
#: ``S3_CONNECT_TIMEOUT_S``; a server that accepts and never answers after ``S3_READ_TIMEOUT_S``
#: (which bounds each socket read, not a whole download: a slow large image still arrives).
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 15.0

# One HTTP request per call: botocore's retries (10 attempts of up to 20 s backoff under
# _S3_DEFAULTS) and s3fs's (5, nested twice around a GET: 25 tries) multiplied to 627 s for
# one image read against an endpoint with user:pass@ in it, and to 65 s against a refused
# connection, where memscore's own loop wanted to give up after 2 s.
_BOUNDED_RETRIES = {"mode": "standard", "total_max_attempts": 1}
_BOUNDED_S3FS_RETRIES = 1

# botocore takes the endpoint from these when the options name none (AWS_ENDPOINT_URL_S3 first).
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageOptionsError(ValueError):
    """S3 storage options (or the AWS_* variables that stand in for them) that no request can
    succeed with: an endpoint URL that is not one, or that carries credentials, an invalid
    region name. Raised by ``url_to_fs`` before any request; ``str(exc)`` is one line that
    never shows a password."""


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
    """(fsspec filesystem, path inside it) for a local path or URL.

    S3 options are checked first (``check_s3_options``): a configuration no request can
    succeed with raises ``StorageOptionsError`` at once, where the client would find out only
    on its first request, and for credentials in the endpoint URL retry it for minutes.
    """
    options = dict(storage_options or {})
    if _protocol(path) in ("s3", "s3a"):
        check_s3_options(options)
        # a copy: botocore rewrites the retries dict it is given in place (max_attempts N ->
        # total_max_attempts N + 1), which would otherwise change the module's defaults
        options = {**copy.deepcopy(_S3_DEFAULTS), **options}
    return fsspec.core.url_to_fs(path, **options)


def bounded_url_to_fs(path: str, storage_options: Mapping[str, Any] | None = None):
    """``url_to_fs`` for a caller that retries under a deadline of its own (memscore's image
    reads, ``memscore.stages.fetch``): on S3 each call is one HTTP request, bounded in time.

    botocore makes one attempt (``total_max_attempts`` 1, whatever the options say) and s3fs
    does not retry (``retries`` 1), each request bounded by the options' ``connect_timeout`` and
    ``read_timeout``, else ``S3_CONNECT_TIMEOUT_S`` and ``S3_READ_TIMEOUT_S``. Other protocols
    (and chained URLs) are ``url_to_fs``'s.

    Example:
        >>> fs, inner = bounded_url_to_fs("s3://bucket/a.jpg", {"anon": True})
        >>> fs.retries, fs.config_kwargs["retries"], fs.config_kwargs["read_timeout"], inner
        (1, {'mode': 'standard', 'total_max_attempts': 1}, 15.0, 'bucket/a.jpg')
    """
    options = dict(storage_options or {})
    if _protocol(path) not in ("s3", "s3a"):
        return url_to_fs(path, options)
    config = dict(options.get("config_kwargs") or {})
    config["retries"] = dict(_BOUNDED_RETRIES)
    config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
    config.setdefault("read_timeout", S3_READ_TIMEOUT_S)
    fs, inner = url_to_fs(path, {**options, "config_kwargs": config})
    # An instance attribute, not an option (s3fs takes none): fsspec's instance cache keys on
    # the options, so only clients made here, with the bounded config above, share this one.
    fs.retries = _BOUNDED_S3FS_RETRIES
    return fs, inner


def _redacted_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{scheme}{sep}{authority}{slash}{tail}"


def check_s3_options(options: Mapping[str, Any]) -> None:
    """Raise ``StorageOptionsError`` for S3 options that no request can succeed with.

    Checked as botocore checks them when it makes a client (``Invalid endpoint``,
    ``InvalidRegionError``), and one thing it lets through to aiohttp, which then fails every
    request after all the retries: credentials in the endpoint URL (``user:pass@``). The
    endpoint is the options' ``endpoint_url`` (or ``client_kwargs.endpoint_url``), else
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; the region ``client_kwargs.region_name``,
    else ``AWS_DEFAULT_REGION``. Nothing here makes a request.

    Example:
        >>> check_s3_options({"endpoint_url": "http://minio.local:9000"})
        >>> check_s3_options({"endpoint_url": "http://me:hunter2@minio.local:9000"})
        Traceback (most recent call last):
        ...
        memscore.storage.StorageOptionsError: endpoint_url http://***@minio.local:9000 has credentials in it (user:password@), which S3 requests cannot use: give them as the key and secret storage options, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
    """
    import os

    client_kwargs = options.get("client_kwargs") or {}
    endpoint, source = options.get("endpoint_url"), "endpoint_url"
    if endpoint is None and isinstance(client_kwargs, Mapping):
        endpoint, source = client_kwargs.get("endpoint_url"), "client_kwargs.endpoint_url"
    ignore_variables = os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"
    for variable in () if endpoint is not None or ignore_variables else _ENDPOINT_VARIABLES:
        if os.environ.get(variable):
            endpoint, source = os.environ[variable], variable
            break
    if endpoint is not None:
        _check_endpoint(str(endpoint), source)
    region, source = None, "client_kwargs.region_name"
    if isinstance(client_kwargs, Mapping):
        region = client_kwargs.get("region_name")
    if region is None:
        region, source = os.environ.get("AWS_DEFAULT_REGION") or None, "AWS_DEFAULT_REGION"
    if region is not None:
        from botocore.utils import validate_region_name

        try:
            validate_region_name(str(region))
        except ValueError as exc:  # InvalidRegionError is one
            raise StorageOptionsError(f"{source}: {exc}") from None


def _check_endpoint(endpoint: str, source: str) -> None:
    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    shown = _redacted_url(endpoint)
    if "@" in endpoint.partition("://")[2].partition("/")[0]:
        raise StorageOptionsError(
            f"{source} {shown} has credentials in it (user:password@), which S3 requests "
            f"cannot use: give them as the key and secret storage options, or "
            f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    try:
        valid = "://" in endpoint and (
            is_valid_endpoint_url(endpoint) or is_valid_ipv6_endpoint_url(endpoint)
        )
        if valid:
            from urllib.parse import urlsplit

            urlsplit(endpoint).port  # noqa: B018  (raises for a port out of range)
    except ValueError:
        valid = False
    if not valid or endpoint.partition("://")[0].lower() not in ("http", "https"):
        raise StorageOptionsError(
            f"{source} {shown} is not an endpoint URL (http:// or https://, a host name and "
            f"an optional port)"
        )


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


def write_under(
    root: str, relative: str, data: bytes, storage_options: Mapping[str, Any] | None = None
) -> str:
    """Write ``data`` to ``relative`` ("a/b.png") under folder ``root``, whole or not at all
    (``write_atomic``); -> the file's path. A local folder is made first: an object store has
    none to make."""
    name = join(root, *relative.split("/"))
    if not is_url(name):
        import os

        os.makedirs(os.path.dirname(name), exist_ok=True)
    write_atomic(name, data, storage_options)
    return name


def write_atomic(path: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
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
