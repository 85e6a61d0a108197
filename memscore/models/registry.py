"""The model registry: one table of names, each with its weights enum and its builder.

The table is derived from the weights enums: each built-in model's enum is declared in
``weights.py`` with its name and the module that registers its builder
(``@builtin_model(name, module)``; ``weights.BUILTIN_MODELS``). A model module imports torch, so
it is imported only when that model is built (``@register_model`` on its builder fills the
entry); ``weights.py`` does not, so a job's driver plans a run, names its columns and checks
its weights without torch.

``--weights`` (and ``get_model``'s ``weights``) is read by one rule: a value that is exactly the
name of a member of the model's weights enum (``DEFAULT``, ``RETRAIN`` ...; case-sensitive) is
that member; anything else is a checkpoint, a file or folder, local or a URL (a ``pathlib.Path``
always is). A folder named like a member is given as ``./DEFAULT``. Models with folder weights
(the traces and autoencoders) take a folder or a Hugging Face model id instead of a checkpoint.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from memscore.models._api import FolderWeights, FolderWeightsEnum, WeightsEnum, output_columns_of
from memscore.models.weights import BUILTIN_MODELS

__all__ = [
    "register_model",
    "list_models",
    "get_model_builder",
    "get_model_weights",
    "get_model",
    "resolve_weights",
    "weights_member",
    "is_checkpoint",
    "check_checkpoint",
    "weights_for",
    "weights_aliases",
    "registry_table",
]


@dataclass(frozen=True)
class _Entry:
    weights_enum: type[WeightsEnum]
    module: str  # the module whose import registers the builder
    builder: Callable[..., Any] | None = None  # None: a built-in whose module is not imported yet


# The registry. The built-in models are here from the start, builder to come; a model of a
# user's own (``register_model``) joins with its builder.
_MODELS: dict[str, _Entry] = {
    name: _Entry(weights_enum, module) for name, (weights_enum, module) in BUILTIN_MODELS.items()
}


def register_model(name: str, weights_enum: type[WeightsEnum]):
    """Decorator: register ``builder(*, weights=None, checkpoint=None, **kwargs)`` under
    ``name`` with its weights enum; a name already taken raises ``ValueError``.

    Args:
        name: the model's name, as ``--model`` and ``get_model`` take it.
        weights_enum: its ``WeightsEnum`` (the weights ``--weights`` may name, their
            preprocessing and meta).

    Example:
        >>> from memscore.models import register_model, get_model_weights
        >>> register_model("resmem", get_model_weights("resmem"))(lambda **kw: None)
        Traceback (most recent call last):
        ...
        ValueError: a model named 'resmem' is already registered
    """

    def wrap(builder):
        entry = _MODELS.get(name)
        builtin_slot = (
            entry is not None
            and entry.builder is None
            and entry.module == builder.__module__
            and entry.weights_enum is weights_enum
        )
        if entry is not None and not builtin_slot:
            raise ValueError(f"a model named {name!r} is already registered")
        _MODELS[name] = _Entry(weights_enum, builder.__module__, builder)
        return builder

    return wrap


def list_models() -> list[str]:
    """Names of the registered models, sorted.

    Example:
        >>> from memscore.models import list_models
        >>> [name for name in list_models() if "resmem" in name]
        ['falseresmem', 'resmem']
    """
    return sorted(_MODELS)


def _entry(name: str) -> _Entry:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; registered models: {', '.join(list_models())}"
        ) from None


def get_model_builder(name: str) -> Callable[..., Any]:
    """The builder of model ``name`` (importing its module, and so torch, for a built-in).

    Args:
        name: a name from ``list_models()``.

    Example:
        >>> from memscore.models import get_model_builder
        >>> get_model_builder("memnet").__name__
        'memnet'
    """
    if _entry(name).builder is None:
        importlib.import_module(_MODELS[name].module)  # registers the builder
    return _MODELS[name].builder


def get_model_weights(name: str) -> type[WeightsEnum]:
    """The weights enum of model ``name`` (imports no torch for the built-in models).

    Args:
        name: a name from ``list_models()``.

    Example:
        >>> from memscore.models import get_model_weights
        >>> weights = get_model_weights("resmem")
        >>> weights.names()[0], weights.DEFAULT.meta["output_column"]
        ('DEFAULT', 'memorability')
    """
    return _entry(name).weights_enum


def weights_aliases(name: str, member: WeightsEnum) -> list[str]:
    """The other names ``--weights`` takes for ``member`` of model ``name``'s weights: today
    ``DEFAULT`` for the default member. ``memscore models`` shows them beside the member, since
    ``--weights`` and its errors accept and list them.

    Example:
        >>> from memscore.models import get_model_weights
        >>> enum = get_model_weights("memnet")
        >>> weights_aliases("memnet", enum.LEGACY), weights_aliases("memnet", enum.MODERN)
        (['DEFAULT'], [])
    """
    enum_cls = get_model_weights(name)
    return [
        alias
        for alias, found in enum_cls.__members__.items()
        if found is member and alias != member.name
    ]


def resolve_weights(name: str, weights: Any = "DEFAULT") -> WeightsEnum | None:
    """Turn ``weights`` (None, a member, or a member's name) into the model's weights member.

    Args:
        name: a name from ``list_models()``.
        weights: None (random initialisation: None comes back), a member of the model's
            weights enum, or exactly a member's name; anything else is a ``ValueError`` (a
            checkpoint path is ``get_model``'s to load, not a member).

    Example:
        >>> from memscore.models import resolve_weights
        >>> resolve_weights("memnet", "DEFAULT").name
        'LEGACY'
    """
    if weights is None:
        return None
    return get_model_weights(name).verify(weights)


def weights_member(name: str, weights: Any) -> WeightsEnum | None:
    """The member of model ``name``'s weights enum that ``weights`` is, or is exactly the name
    of; None for anything else (a checkpoint, a folder, a model id, None).

    Example:
        >>> weights_member("resmem", "DEFAULT").name, weights_member("resmem", "best")
        ('RETRAIN', None)
    """
    if isinstance(weights, WeightsEnum):
        return get_model_weights(name).verify(weights)
    return get_model_weights(name).member_named(weights)


def is_checkpoint(name: str, weights: Any) -> bool:
    """Whether ``weights`` given for model ``name`` names a checkpoint (a file or folder, local
    or a URL): anything but None, ``FolderWeights`` and the enum's members and their names."""
    return (
        weights is not None
        and not isinstance(weights, FolderWeights)
        and weights_member(name, weights) is None
    )


def check_checkpoint(
    name: str, weights: Any, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Raise ``ValueError`` with one line when checkpoint ``weights`` is not there: a value that
    is neither a member's name nor a file or folder is named with both readings."""
    from memscore import storage

    fs, inner = storage.url_to_fs(str(weights), storage_options)
    if fs.exists(inner):
        return
    message = f"--weights {str(weights)!r}: no such checkpoint file or folder"
    if not storage.is_url(str(weights)):
        message += (
            f", and not a weights name of {name} ({', '.join(get_model_weights(name).names())})"
        )
    raise ValueError(message)


def weights_for(
    name: str, weights: Any, storage_options: Mapping[str, Any] | None = None
) -> WeightsEnum | FolderWeights:
    """The weights member whose preprocessing and meta apply to ``weights``.

    A member or its name is itself; None is DEFAULT. Anything else is a checkpoint: a memscore
    checkpoint (``memscore finetune``'s output) names its member in its JSON, a plain state_dict
    file takes DEFAULT's; a checkpoint of another model, or one that is not there, is a
    ``ValueError``. A model with folder weights (``FolderWeightsEnum``) gets ``FolderWeights``
    for the folder or model id ``weights`` names (None or a member: its default), read from the
    folder.
    """
    enum_cls = get_model_weights(name)
    if issubclass(enum_cls, FolderWeightsEnum):  # the folder's own settings, read now
        if isinstance(weights, FolderWeights):
            return weights
        member = weights_member(name, weights)
        if member is not None and member is not enum_cls.DEFAULT:
            raise ValueError(f"{name}: weights {member.name} are not its default; give a folder")
        default = weights is None or member is not None
        return enum_cls.bind(None if default else str(weights), storage_options)
    if weights is None:
        return enum_cls.DEFAULT
    member = weights_member(name, weights)
    if member is not None:
        return member
    check_checkpoint(name, weights, storage_options)
    from memscore.models.checkpoint import read_checkpoint_info

    info = read_checkpoint_info(str(weights), storage_options)
    if info is None:
        return enum_cls.DEFAULT
    if info["model"] != name:
        raise ValueError(f"{weights} is a checkpoint of {info['model']!r}, not of {name!r}")
    return enum_cls.verify(info["weights"])


def get_model(name: str, *, weights: Any = "DEFAULT", **kwargs):
    """Build registered model ``name`` with ``weights`` loaded strictly, in eval mode.

    Args:
        name: a name from ``list_models()``.
        weights: a member of the model's weights enum or exactly its name (``"DEFAULT"``,
            case-sensitive); anything else is a checkpoint: a state_dict file or a
            ``memscore finetune`` checkpoint folder, local or URL (a folder named like a member
            is ``"./DEFAULT"``; a ``pathlib.Path`` is always a checkpoint); ``None`` for random
            initialisation. Models with folder weights (the traces) take a Hugging Face model
            id or a ``save_pretrained`` folder, or ``FolderWeights``.
        **kwargs: passed to the model's builder (``storage_options`` for a remote checkpoint).

    Example:
        >>> import memscore
        >>> model = memscore.get_model("resmem", weights=None)
        >>> model.eval() is model
        True
    """
    builder = get_model_builder(name)
    if issubclass(get_model_weights(name), FolderWeightsEnum):
        if weights is not None:
            weights = weights_for(name, weights, kwargs.get("storage_options"))
        return builder(weights=weights, **kwargs).eval()
    if is_checkpoint(name, weights):  # a checkpoint file or memscore checkpoint folder
        member = weights_for(name, weights, kwargs.get("storage_options"))
        model = builder(weights=member, checkpoint=str(weights), **kwargs)
    else:
        model = builder(weights=resolve_weights(name, weights), **kwargs)
    return model.eval()


def registry_table() -> list[dict]:
    """Every weights member of every registered model, as ``memscore models`` shows it."""
    rows = []
    for name in list_models():
        enum = get_model_weights(name)
        for member in enum:
            meta = member.meta
            rows.append(
                {
                    "model": name,
                    "weights": member.name,
                    "default": member is enum.DEFAULT,
                    # DEFAULT: what --weights also takes for it, as its errors list
                    "aliases": weights_aliases(name, member),
                    # several for a traces model: <encoder>_cls_mean, ...
                    "output_column": ",".join(output_columns_of(meta)),
                    "input_size": list(meta.get("input_size", ())),
                    "source": meta.get("source"),
                    "licence": meta.get("licence"),
                    "paper": meta.get("paper"),
                }
            )
    return rows
