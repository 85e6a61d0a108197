"""The weights objects and their loading, in the manner of torchvision's ``models/_api.py``.

A weights object ties together the file that holds the parameters, the preprocessing those
parameters were trained with, and what a user must know about them (output column, score range,
licence, paper). Loading is always strict and never unpickles code: torch files go through
``torch.load(weights_only=True)``, ``.safetensors`` through safetensors. This module knows no
model: each model's weights enum is in ``weights.py``, the registry of names in ``registry.py``,
and both import from here, never the other way.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memscore.errors import first_line
from memscore.models.transforms import ImagePreprocess

__all__ = [
    "Weights",
    "WeightsEnum",
    "FolderWeights",
    "FolderWeightsEnum",
    "COLUMN_TYPES",
    "output_columns_of",
    "WeightsNotFoundError",
    "CheckpointKeyError",
    "package_file",
    "load_state_dict_file",
    "load_state_dict_strict",
    "build_with_weights",
    "build_from_checkpoint",
    "file_sha256",
]


class WeightsNotFoundError(FileNotFoundError):
    """The file a set of weights needs is not on this machine; the message says how to get it.

    Example:
        >>> from memscore.models import WeightsNotFoundError, get_model
        >>> try:
        ...     get_model("memnet")  # no published MemNet weights ship with memscore
        ... except WeightsNotFoundError as exc:
        ...     print(str(exc)[:40])
        MemNet has no downloadable weights here:
    """


class CheckpointKeyError(RuntimeError):
    """A state_dict does not match the module's parameters; the message names the keys.

    Example:
        >>> import torch
        >>> from memscore.models._api import load_state_dict_strict
        >>> load_state_dict_strict(torch.nn.Linear(2, 1), {"weight": torch.zeros(1, 2)})
        Traceback (most recent call last):
        ...
        memscore.models._api.CheckpointKeyError: checkpoint does not fit Linear: missing keys: bias
    """


@dataclass(frozen=True)
class Weights:
    """One set of parameters for one architecture.

    Args:
        locate: returns the local path of the weights file, or raises ``WeightsNotFoundError``
            saying what to install. A callable, so that nothing is looked up at import time.
        transforms: the preprocessing the parameters expect.
        meta: facts about the weights; memscore reads ``output_column`` (the Parquet column the
            score goes to), ``score_range``, ``licence``, ``paper`` and ``source``.
        map_location: where tensors are mapped on load (some published files hold CUDA tensors).

    Example:
        >>> from memscore.models import get_model_weights
        >>> weights = get_model_weights("resmem").DEFAULT.value  # a Weights
        >>> weights.transforms.resize, weights.transforms.crop, weights.path().name
        ((256, 256), 227, 'model.pt')
    """

    locate: Callable[[], Path]
    transforms: ImagePreprocess
    meta: Mapping[str, Any] = field(default_factory=dict)

    def path(self) -> Path:
        return Path(self.locate())

    def load_state_dict(self) -> dict:
        return load_state_dict_file(self.path())


class WeightsEnum(enum.Enum):
    """Base class of each model's weights enum; members are ``Weights``, ``DEFAULT`` aliases one.

    A model's enum is what ``--weights`` names: exactly a member's name picks that member;
    anything else is a checkpoint (``memscore.models.registry.is_checkpoint``).

    Example:
        >>> from memscore.models import get_model_weights
        >>> enum = get_model_weights("memnet")
        >>> enum.names(), enum.verify("DEFAULT") is enum.LEGACY, enum.member_named("best")
        (['DEFAULT', 'LEGACY', 'MODERN'], True, None)
    """

    @classmethod
    def names(cls) -> list[str]:
        """Every member's name, aliases included, DEFAULT first: what ``--weights`` takes."""
        return sorted(cls.__members__, key=lambda name: (name != "DEFAULT", name))

    @classmethod
    def member_named(cls, name: Any) -> WeightsEnum | None:
        """The member ``name`` is exactly the name of (case-sensitive, aliases included), else
        None: a value that names no member is a checkpoint. Only a ``str`` names a member; a
        ``pathlib.Path`` is always a path."""
        return cls.__members__.get(name) if isinstance(name, str) else None

    @classmethod
    def verify(cls, obj: Any) -> WeightsEnum:
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, str):
            member = cls.member_named(obj)
            if member is None:
                raise ValueError(
                    f"unknown weights {obj!r} for {cls.__name__}; choose from "
                    f"{', '.join(cls.names())}"
                )
            return member
        raise TypeError(f"weights must be a {cls.__name__} member or its name, got {obj!r}")

    @property
    def transforms(self) -> ImagePreprocess:
        return self.value.transforms

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.value.meta

    def path(self) -> Path:
        return self.value.path()

    def load_state_dict(self) -> dict:
        return self.value.load_state_dict()


@dataclass(frozen=True)
class FolderWeights:
    """Weights named at run time by a folder: a Hugging Face model id or a ``save_pretrained``
    folder, local or a URL. What ``weights_for`` gives for a model whose weights enum is a
    ``FolderWeightsEnum`` (the ``<encoder>-traces`` models): the folder itself holds the tensors,
    the architecture's config and the preprocessing settings, so they are read from it, not
    declared in advance.

    Args:
        name: ``DEFAULT`` when the folder is the model's default (its enum's DEFAULT source),
            else ``folder``; what a run's summary records as the weights.
        source: ``--weights`` as given (the model id or the path), or the default's id.
        folder: where the folder is: a local path, or a URL.
        transforms: the preprocessing the folder's own settings describe.
        meta: the model's facts (its enum's DEFAULT member's meta).
        digest: ``digest(folder, storage_options) -> str``, the sha256 of the files that decide
            the model's outputs (a module-level function, so the object pickles).
    """

    name: str
    source: str
    folder: str
    transforms: Any
    meta: Mapping[str, Any]
    digest: Callable[..., str]

    def path(self) -> str:
        return self.folder

    def sha256(self, storage_options: Mapping[str, Any] | None = None) -> str:
        return self.digest(self.folder, storage_options)


class FolderWeightsEnum(WeightsEnum):
    """Weights enum of a model whose weights are a folder named at run time (``FolderWeights``).

    Its ``DEFAULT`` member carries the model's meta and the preprocessing of its default folder
    (what a randomly initialised model, ``get_model(name, weights=None)``, is given); ``bind``
    turns a ``--weights`` value (None: the default) into ``FolderWeights``, reading the folder's
    own settings, and raises ``WeightsNotFoundError`` or ``ValueError`` with one line.
    """

    @classmethod
    def bind(
        cls, weights: str | None, storage_options: Mapping[str, Any] | None = None
    ) -> FolderWeights:
        raise NotImplementedError(f"{cls.__name__} does not say how to read a folder")


#: The Arrow types a model's output columns may have, as ``output_columns_of`` names them:
#: a score, or one value per layer (``list<float32>``, the traces).
COLUMN_TYPES = ("float32", "list<float32>")


def output_columns_of(meta: Mapping[str, Any]) -> dict[str, str]:
    """The columns a model with these weights' ``meta`` writes, name -> type (``COLUMN_TYPES``),
    before any ``--column-prefix``: ``meta["output_columns"]`` where the model writes several
    (the traces), else its one float32 score, ``meta["output_column"]``."""
    columns = dict(meta.get("output_columns") or {meta["output_column"]: "float32"})
    unknown = {name: kind for name, kind in columns.items() if kind not in COLUMN_TYPES}
    if unknown:
        raise ValueError(f"output column types {unknown} are not among {COLUMN_TYPES}")
    return columns


def package_file(package: str, filename: str, install_hint: str) -> Callable[[], Path]:
    """A ``locate`` function for a weights file shipped inside an installed package.

    The package is found with ``importlib.util.find_spec`` and never imported: importing
    ``resmem`` pulls in its own model code, which memscore must not depend on.
    """

    def locate() -> Path:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsNotFoundError(
                f"the weights file {filename} ships in the PyPI package {package!r}, which is not "
                f"installed; {install_hint}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise WeightsNotFoundError(f"{path} is missing from the installed {package!r} package")
        return path

    return locate


def load_state_dict_file(
    path: str | Path, storage_options: Mapping[str, Any] | None = None
) -> dict:
    """Read a state_dict without executing code: safetensors, or torch with ``weights_only=True``.

    ``path`` may be local or any fsspec URL (``s3://...``). Tensors are mapped to the CPU.
    """
    import fsspec
    import torch

    from memscore.models.checkpoint import state_dict_file

    path = state_dict_file(str(path), storage_options)  # a checkpoint folder -> its model file
    local = "://" not in path
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors, load_file

        if local:
            return load_file(path)
        with fsspec.open(path, "rb", **dict(storage_options or {})) as f:
            return load_safetensors(f.read())
    import io

    if local:
        # mmap: the tensors are read from the page cache as the model is assigned them,
        # instead of a second in-memory copy of a 0.5 GB file.
        source, extra = path, {"mmap": True}
    else:
        with fsspec.open(path, "rb", **dict(storage_options or {})) as f:
            source, extra = io.BytesIO(f.read()), {}
    try:
        state = torch.load(source, map_location="cpu", weights_only=True, **extra)
    except Exception as exc:  # torch raises UnpicklingError with a long text; keep the gist
        raise ValueError(
            f"{path} is not a plain tensor checkpoint (refused by torch.load(weights_only=True)): "
            f"{first_line(exc)}"
        ) from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return dict(state)


def load_state_dict_strict(
    module, state_dict: Mapping[str, Any], source: str = "checkpoint", *, assign: bool = False
) -> None:
    """``module.load_state_dict(strict=True)`` with an error that names the mismatched keys."""
    expected = set(module.state_dict())
    given = set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:

        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise CheckpointKeyError(
            f"{source} does not fit {type(module).__name__}: " + "; ".join(parts)
        )
    module.load_state_dict(state_dict, strict=True, assign=assign)


def build_with_weights(factory: Callable[[], Any], state_dict: Mapping[str, Any], source: str):
    """``factory()`` built on the meta device, then given ``state_dict``'s tensors, strictly.

    Random initialisation of a ResNet-152 costs seconds that the loaded weights would overwrite
    anyway; on the meta device it costs nothing.
    """
    import torch

    with torch.device("meta"):
        module = factory()
    load_state_dict_strict(module, state_dict, source, assign=True)
    left = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:  # a non-persistent buffer the checkpoint cannot carry
        raise CheckpointKeyError(f"{source} leaves {', '.join(left[:8])} uninitialised")
    return module


def file_sha256(
    path: str | Path, chunk: int = 1 << 22, storage_options: Mapping[str, Any] | None = None
) -> str:
    """sha256 of a local file or any fsspec URL, read in chunks.

    Digests are remembered in ``$MEMSCORE_CACHE`` (default ``~/.cache/memscore``), keyed by
    fsspec's ``ukey`` of the file (a hash of its ``info``: size, modification time and inode
    of a local file; size and ETag of an S3 object), the way pip and the Hugging Face hub avoid
    re-hashing: hashing ResMem's 0.5 GB file costs seconds of a core on every run otherwise,
    while the model actors start on the same cores.
    """
    import fsspec

    fs, inner = fsspec.core.url_to_fs(str(path), **dict(storage_options or {}))
    key = _sha256_cache_key(fs, inner)
    cached = _sha256_cache_dir() / f"{key}.sha256"
    try:
        digest_hex = cached.read_text().strip()
        if len(digest_hex) == 64:
            return digest_hex
    except OSError:
        pass
    digest = hashlib.sha256()
    with fs.open(inner, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    try:  # a cache that cannot be written (read-only home) only costs the next run the hashing
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(digest.hexdigest())
        os.replace(partial, cached)
    except OSError:
        pass
    return digest.hexdigest()


def _sha256_cache_key(fs, inner: str) -> str:
    """The cache key of file ``inner`` on ``fs``: its URL and fsspec's ``ukey``.

    ``ukey`` hashes ``fs.info``, which changes with the content (a local file's mtime and size,
    an S3 object's ETag). On S3 ``info`` is a HEAD request, or an entry of a cached listing of
    the folder, whose fields differ (s3fs 2026.9: ``Key``/``Size`` and another time zone), so
    one unchanged object had two keys depending on whether its folder had been listed (a
    checkpoint folder is, by ``state_dict_file``): dropping the cached listing first gives the
    HEAD's key every time, for one request. The URL keeps two filesystems' keys apart in one
    cache folder.
    """
    fs.invalidate_cache(inner)
    return hashlib.sha256(f"{fs.unstrip_protocol(inner)}\0{fs.ukey(inner)}".encode()).hexdigest()


def _sha256_cache_dir() -> Path:
    root = os.environ.get("MEMSCORE_CACHE") or Path.home() / ".cache" / "memscore"
    return Path(root) / "sha256"


def build_from_checkpoint(
    factory: Callable[[], Any],
    checkpoint: str | Path,
    storage_options: Mapping[str, Any] | None = None,
):
    """``factory()`` given the tensors of a checkpoint file (local or URL), strictly."""
    return build_with_weights(
        factory, load_state_dict_file(checkpoint, storage_options), source=str(checkpoint)
    )
