"""memscore: image memorability scores for large image collections, with Ray.

Architecture (one job per module):

- ``config``     ScoreConfig, FinetuneConfig, EvaluateConfig: validated options objects (the
                 CLI and jobs/ are generated from them).
- ``errors``     MemscoreError (a problem the user can fix) and ``first_line``, its one-line form.
- ``columns``    the names of the columns memscore adds (``memscore_row``, ``memscore_error``, ...).
- ``manifest``   reader: finds and validates the manifest, reads its rows as a Ray Dataset.
- ``decode``     CPU stage: fetch bytes (fsspec), decode with Pillow, to the model's uint8 input;
                 per-row failures become the row's ``memscore_error``.
- ``error_fraction`` ``--max-error-fraction``: the run's error count, an actor decode tasks report to.
- ``predict``    model stage: ScoreImages, the callable class run as a Ray actor pool.
- ``output``     writer: output folder rules, Parquet, the ``_memscore.json`` run summary.
- ``run``        the job: wires the stages together and plans GPU/CPU model actors.
- ``models``     the registry and the models, each with weights that carry preprocessing and meta.
- ``transforms`` the preprocessing objects the weights carry.
- ``storage``    fsspec/pyarrow filesystems for local and s3:// paths.
- ``cluster_check`` before a run on several nodes: every node sees the local output and images.
- ``checkpoint`` memscore checkpoints: model.safetensors + memscore.json in a folder.
- ``splits``     deterministic train/validation/test splits.
- ``finetune``   the fine-tuning job: splits -> the shared decode stage -> Ray Train.
- ``train_loop`` what each Ray Train worker runs.
- ``metrics``    Spearman, Pearson, MSE, MAE, bootstrap intervals.
- ``evaluate``   predictions against ground truth: figures, report, plots (``plots``).
- ``verify``     every manifest row in an output exactly once.
- ``cli``        ``memscore score|finetune|evaluate|verify|models``.

Importing memscore imports neither torch nor Ray; they load when a model or a run needs them.
"""

from memscore.config import EvaluateConfig, FinetuneConfig, ScoreConfig
from memscore.errors import MemscoreError

# The fine-tuning and evaluation jobs are `memscore.finetune.finetune` and
# `memscore.evaluate.evaluate`: functions of those names here would be shadowed by the
# submodules as soon as they are imported.
__all__ = ["MemscoreError", "ScoreConfig", "FinetuneConfig", "EvaluateConfig", "score",
           "list_models", "get_model", "__version__"]
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
