"""memscore: image memorability scores for large image collections, with Ray.

Architecture (one job per module):

- ``config``     ScoreConfig, the one validated options object (the CLI is generated from it).
- ``manifest``   reader: finds and validates the manifest, reads its rows as a Ray Dataset.
- ``decode``     CPU stage: fetch bytes (fsspec), decode with Pillow, to the model's uint8 input;
                 per-row failures become the row's ``error``.
- ``predict``    model stage: ScoreImages, the callable class run as a Ray actor pool.
- ``output``     writer: output folder rules, Parquet, the ``_memscore.json`` run summary.
- ``run``        the job: wires the stages together and plans GPU/CPU model actors.
- ``models``     the registry and the models, each with weights that carry preprocessing and meta.
- ``transforms`` the preprocessing objects the weights carry.
- ``storage``    fsspec/pyarrow filesystems for local and s3:// paths.
- ``cli``        ``memscore score`` and ``memscore models``.

Importing memscore imports neither torch nor Ray; they load when a model or a run needs them.
"""

from memscore.config import MemscoreError, ScoreConfig

__all__ = ["MemscoreError", "ScoreConfig", "score", "list_models", "get_model", "__version__"]
__version__ = "0.1.0"


def score(config: ScoreConfig) -> dict:
    """Run the scoring job; see ``memscore.run.score``."""
    from memscore.run import score as _score

    return _score(config)


def list_models() -> list[str]:
    """Names of the registered models."""
    from memscore.models import list_models as _list_models

    return _list_models()


def get_model(name: str, *, weights="DEFAULT", **kwargs):
    """Build a registered model with its weights, in eval mode; see ``memscore.models.get_model``."""
    from memscore.models import get_model as _get_model

    return _get_model(name, weights=weights, **kwargs)
