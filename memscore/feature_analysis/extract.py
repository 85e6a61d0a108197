"""The feature job's model stage: the model's score and its layers' channel activations, from
one forward pass per batch.

``FeatureImages`` is ``ScoreImages`` (the same actor pool, batching, devices, precision and error
rows) with forward hooks on the named layers: each row gets the model's score column, as
``memscore score`` writes it, and one ``list<float32>`` column per layer, ``activation:<layer>``,
holding that layer's channels' activations (see ``activations``). Rows whose image could not be
decoded keep their error and get nulls, as in scoring.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from memscore.feature_analysis.activations import LayerActivations
from memscore.stages.predict import ScoreImages

__all__ = ["ACTIVATION_PREFIX", "FeatureImages", "activation_column"]

ACTIVATION_PREFIX = "activation:"


def activation_column(layer: str) -> str:
    return f"{ACTIVATION_PREFIX}{layer}"


class _Recorded:
    """The model with hooks on its layers: its forward returns the score and, under their
    columns, the layers' (N, C) activations (the dict form ``ScoreImages`` writes as columns)."""

    def __init__(self, model, score_key: str, hooks: LayerActivations) -> None:
        self.model = model
        self.score_key = score_key
        self.hooks = hooks

    def __call__(self, batch):
        score = self.model(batch)
        outputs = {activation_column(name): value for name, value in self.hooks.take().items()}
        return {self.score_key: score.reshape(-1), **outputs}


class FeatureImages(ScoreImages):
    """``ScoreImages`` for one model, plus one activation column per layer in ``layers``.

    Args:
        models: one registered model name, as a 1-tuple (``ScoreImages``' argument; the
            activations are that model's own).
        layers: module names of that model.
        reduce: "mean" or "max" over positions.
        views: the model's views per image (10 for MemNet's ten crops), see ``activations``.
        **kwargs: as ``ScoreImages`` takes them (weights, use_gpu, batch_size, ...).
    """

    def __init__(self, models, *, layers, reduce: str = "mean", views: int = 1, **kwargs):
        if len(models) != 1:
            raise ValueError(f"features come from one model, not {len(models)}")
        model = models[0]
        super().__init__(tuple(models), **kwargs)
        name, preprocess, columns, module = self._runners[0]
        if len(columns) != 1:
            raise ValueError(f"{model} writes {len(columns)} columns; features need one score")
        score_key = next(iter(columns))
        hooks = LayerActivations(module, layers, reduce=reduce, views=views)
        columns = dict(columns)
        for layer in layers:
            key = activation_column(layer)
            columns[key] = (key, pa.list_(pa.float32()))
        self._runners[0] = (name, preprocess, columns, _Recorded(module, score_key, hooks))
        bookkeeping = self._added[1:]  # after the score column: error, model, width, height
        self._added = [self._added[0], *(activation_column(layer) for layer in layers)]
        self._added += bookkeeping


def activations_of(table: pa.Table, layer: str) -> np.ndarray:
    """(rows, channels) float32 of ``layer`` from an output table whose rows are all scored."""
    column = table.column(activation_column(layer)).combine_chunks()
    if column.null_count:
        raise ValueError(f"{activation_column(layer)} has null rows: filter the errors out first")
    if len(column) == 0:
        return np.zeros((0, 0), np.float32)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), -1).astype(np.float32, copy=False)
