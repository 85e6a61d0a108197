"""The model zoo: each model in its own module, registered by name with its weights.

``list_models()`` and ``get_model(name, weights=...)`` are the entry points (``registry``); the
weights objects and their loading are in ``_api``, each model's weights enum in ``weights``.
"""

from memscore.models._api import (
    CheckpointKeyError,
    Weights,
    WeightsEnum,
    WeightsNotFoundError,
)
from memscore.models.registry import (
    get_model,
    get_model_builder,
    get_model_weights,
    list_models,
    register_model,
    resolve_weights,
)

__all__ = [
    "CheckpointKeyError",
    "Weights",
    "WeightsEnum",
    "WeightsNotFoundError",
    "get_model",
    "get_model_builder",
    "get_model_weights",
    "list_models",
    "register_model",
    "resolve_weights",
]
