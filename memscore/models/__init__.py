"""The model zoo: each model in its own module, registered by name with its weights.

``list_models()`` and ``get_model(name, weights=...)`` are the entry points; see ``_api``.
"""

from memscore.models._api import (
    CheckpointKeyError,
    Weights,
    WeightsEnum,
    WeightsNotFoundError,
    get_model,
    get_model_weights,
    list_models,
    resolve_weights,
)

__all__ = [
    "CheckpointKeyError",
    "Weights",
    "WeightsEnum",
    "WeightsNotFoundError",
    "get_model",
    "get_model_weights",
    "list_models",
    "resolve_weights",
]
