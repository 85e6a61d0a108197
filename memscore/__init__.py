"""memscore: image memorability scores for large image collections, with Ray.

A scoring run's data flow, one module per stage (``memscore.scoring.job.score`` wires them):

    manifest -> snapshot -> fetch -> decode -> predict -> output
    (rows)      (ids)       (bytes)  (pixels)  (scores)   (Parquet + _memscore.json)

Which module owns what, for every module: docs/architecture.md.

Importing memscore imports neither torch nor Ray; they load when a model or a run needs them.
"""

from memscore.errors import MemscoreError
from memscore.evaluation.config import EvaluateConfig
from memscore.feature_analysis.config import FeaturesConfig
from memscore.finetuning.config import FinetuneConfig
from memscore.maps.config import MapsConfig
from memscore.scoring.config import ScoreConfig

# The jobs' modules are named for what they do (`finetuning`, `evaluation`), not for the
# functions, so that `memscore.finetune` and `memscore.evaluate` stay these functions once the
# modules are imported (a submodule is set as an attribute of its package on import).
__all__ = [
    "MemscoreError",
    "ScoreConfig",
    "FinetuneConfig",
    "EvaluateConfig",
    "FeaturesConfig",
    "MapsConfig",
    "score",
    "features",
    "draw_maps",
    "finetune",
    "evaluate",
    "list_models",
    "get_model",
    "__version__",
]
__version__ = "0.1.0"


def score(config: ScoreConfig) -> dict:
    """Score every row of ``config.manifest``; write Parquet files and ``_memscore.json``.

    Starts Ray on this machine, or joins the cluster at ``config.address`` (or
    ``RAY_ADDRESS``). Every option is checked first: a bad one stops with one line before any
    Ray work. A bad image is an error value in its row (``memscore_error``), not a failure.

    Args:
        config: the run's options; ``memscore score --help`` explains each.

    Returns:
        The run summary, as written to ``_memscore.json`` in ``config.output``, plus
        ``work_done``: False when ``config.resume`` found the run already complete and did
        nothing (the summary is then the finished run's), else True.

    Raises:
        MemscoreError: one line for each problem the user can fix (no such manifest, a
            manifest without its path column, an output folder that is not empty or that
            another run is writing, ...).

    Example:
        >>> import memscore
        >>> summary = memscore.score(memscore.ScoreConfig("examples/images", output="scores/"))
        >>> summary["status"], summary["rows_in"], summary["rows_scored"], summary["work_done"]
        ('complete', 5, 5, True)
        >>> again = memscore.score(memscore.ScoreConfig("examples/images", output="scores/",
        ...                                             resume=True))
        >>> again["work_done"], again["finished_at"] == summary["finished_at"]
        (False, True)
    """
    from memscore.scoring.job import score as _score

    return _score(config)


def features(config: FeaturesConfig) -> dict:
    """Network feature analysis (the ResMem paper's fig. 13-15) of ``config.model`` on
    ``config.manifest``: each channel of ``config.layers``' top images, its Spearman correlation
    with the model's score, and renderings; see ``memscore features --help`` and
    docs/features.md.

    Returns:
        The run's summary, as written to ``features.json`` in ``config.output``.

    Raises:
        MemscoreError: one line for each problem the user can fix (a layer the model does not
            have, an output folder that is not empty, ...).
    """
    from memscore.feature_analysis.job import features as _features

    return _features(config)


def draw_maps(config: MapsConfig) -> dict:
    """Draw a ``memscore score --maps`` output's maps over its photos (``memscore maps``):
    overlays, a sheet of the most and least memorable, ``maps.json``; see docs/maps.md.

    Returns:
        The summary, as written to ``maps.json`` in ``config.render``.

    Raises:
        MemscoreError: one line for each problem the user can fix (no map column, a used
            --render folder, ...).
    """
    from memscore.maps.job import maps as _maps

    return _maps(config)


def finetune(config: FinetuneConfig) -> dict:
    """Fine-tune a model on a labelled manifest with Ray Train; score and evaluate its test split.

    Args:
        config: the run's options; ``memscore finetune --help`` explains each.

    Returns:
        The run summary, as written to ``finetune.json`` in the run's folder.

    Raises:
        MemscoreError: one line for each problem the user can fix, before any Ray work.

    Example (five labelled images, so it runs in a minute; a real run has thousands):
        >>> import memscore
        >>> labels = {"astronaut.png": (0.82, "train"), "camera.png": (0.64, "train"),
        ...           "chelsea.png": (0.91, "validation"), "coffee.png": (0.58, "validation"),
        ...           "rocket.jpg": (0.77, "validation")}
        >>> with open("labels.csv", "w") as f:
        ...     _ = f.write("path,memorability,split\\n")
        ...     _ = f.writelines(f"examples/images/{name},{label},{split}\\n"
        ...                      for name, (label, split) in labels.items())
        >>> summary = memscore.finetune(memscore.FinetuneConfig(
        ...     "labels.csv", output="runs/", name="lab-a", model="memnet", split_column="split",
        ...     epochs=2))
        >>> summary["status"], summary["rows_trained"], summary["epochs_run"]
        ('complete', 2, 2)
        >>> model = memscore.get_model("memnet", weights=summary["best_checkpoint"])
    """
    from memscore.finetuning.job import finetune as _finetune

    return _finetune(config)


def evaluate(config: EvaluateConfig) -> dict:
    """Evaluate predictions against ground truth: figures, ``report.md``, ``metrics.json``, plots.

    Args:
        config: the predictions, the truth and how to join them, the report folder;
            ``memscore evaluate --help`` explains each option.

    Returns:
        The figures, as written to ``metrics.json`` in ``config.report``.

    Raises:
        MemscoreError: one line for each problem the user can fix.

    Example:
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> import memscore
        >>> pq.write_table(pa.table({"path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"],
        ...                          "memorability": [0.71, 0.93, 0.80, 0.62, 0.75]}),
        ...                "scores.parquet")
        >>> with open("truth.csv", "w") as f:
        ...     _ = f.write("path,hr\\na.jpg,0.64\\nb.jpg,0.88\\nc.jpg,0.79\\n"
        ...                 "d.jpg,0.55\\ne.jpg,0.81\\n")
        >>> result = memscore.evaluate(memscore.EvaluateConfig("scores.parquet", truth="truth.csv",
        ...     truth_column="hr", report="report/"))
        >>> result["counts"]["evaluated"], round(result["overall"]["spearman"], 6)
        (5, 0.9)
        >>> sorted(result["files"])  # report/metrics.json, report.md, scatter.png ...
        ['distribution', 'metrics', 'report', 'scatter']
    """
    from memscore.evaluation.job import evaluate as _evaluate

    return _evaluate(config)


def list_models() -> list[str]:
    """Names of the registered models, sorted: what ``ScoreConfig(models=...)`` takes.

    Example:
        >>> import memscore
        >>> memscore.list_models()  # doctest: +ELLIPSIS
        [..., 'falseresmem', 'm3m', 'memnet', 'resmem', ...]
    """
    from memscore.models import list_models as _list_models

    return _list_models()


def get_model(name: str, *, weights="DEFAULT", **kwargs):
    """Build registered model ``name`` with ``weights`` loaded strictly, in eval mode.

    Args:
        name: a name from ``list_models()``.
        weights: a member of the model's weights enum or exactly its name (``"DEFAULT"``: the
            published weights; case-sensitive); anything else is a checkpoint, a state_dict
            file or a ``memscore finetune`` checkpoint folder, local or URL (a folder named
            like a member is ``"./DEFAULT"``; a ``pathlib.Path`` is always a checkpoint);
            ``None`` for random initialisation.
        **kwargs: passed to the model's builder (``memscore.models.get_model``).

    Example:
        >>> import torch, memscore
        >>> from PIL import Image
        >>> from memscore.models import get_model_weights
        >>> model = memscore.get_model("resmem")
        >>> preprocess = get_model_weights("resmem").DEFAULT.transforms
        >>> with torch.inference_mode():
        ...     score = model(preprocess(Image.open("examples/images/chelsea.png"))[None])
        >>> 0.4 < score.item() < 1
        True
    """
    from memscore.models import get_model as _get_model

    return _get_model(name, weights=weights, **kwargs)
