"""The jobs' config objects, as users import them: ``from memscore.config import ScoreConfig``.

A public name, kept for the code that imports it: each config lives in its job's package
(``memscore.scoring.config.ScoreConfig``, ``finetuning.config.FinetuneConfig``,
``train_sae.config.TrainSAEConfig``, ``evaluation.config.EvaluateConfig``), the generator of
their options in ``memscore.options``, the options the training jobs share in
``memscore.training.options``. Every name this module offered stays importable from it. Nothing
in memscore imports it: it stands above every job, so a job importing it would import every
other job's config through it.

``add_arguments`` and ``from_args`` keep their old default here, ``ScoreConfig``.
"""

from __future__ import annotations

import argparse

from memscore import options

# Re-exported: they lived here before memscore.errors, and users import them from here.
from memscore.errors import MemscoreError, first_line
from memscore.evaluation.config import EvaluateConfig
from memscore.feature_analysis.config import FeaturesConfig
from memscore.finetuning.config import FinetuneConfig
from memscore.maps.config import MapsConfig
from memscore.options import check_model_names, split_model_weights
from memscore.scoring.config import ScoreConfig
from memscore.train_sae.config import SAE_ENCODERS, TrainSAEConfig
from memscore.training.options import TRAINING_DEFAULTS, training_start

__all__ = [
    "MemscoreError",
    "first_line",
    "ScoreConfig",
    "FinetuneConfig",
    "EvaluateConfig",
    "TrainSAEConfig",
    "FeaturesConfig",
    "MapsConfig",
    "SAE_ENCODERS",
    "TRAINING_DEFAULTS",
    "training_start",
    "check_model_names",
    "split_model_weights",
    "add_arguments",
    "from_args",
]


def add_arguments(parser: argparse.ArgumentParser, config_cls=ScoreConfig) -> None:
    """Add one argparse option per config field, with the field's help text
    (``memscore.options.add_arguments``)."""
    options.add_arguments(parser, config_cls)


def from_args(args: argparse.Namespace, config_cls=ScoreConfig):
    """Build the config from parsed arguments (the inverse of ``add_arguments``)."""
    return options.from_args(args, config_cls)
