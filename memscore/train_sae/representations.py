"""Image representations of a vision encoder, by the scoring job's own stages.

``memscore train-sae`` needs, for every training image, the vector the paper's autoencoder reads
(``encoders.representation``). They are computed as images are scored: the manifest's rows go
through the shared CPU decode stage (``pipeline.decode_stage``, with the encoder folder's own
preprocessing) and then through ``EncodeImages``, a model actor pool that loads the encoder once
per actor (``encoders.load_encoder``) and returns each row's vector, or null with the row's
error. ``representation_dataset`` builds that Ray Dataset; ``EncodeImages`` also runs without Ray.

Example:
    >>> import pyarrow as pa
    >>> encode = EncodeImages("dinov2", "/data/dinov2-base")  # doctest: +SKIP
    >>> encode(decoded_table).column(REPRESENTATION).type  # doctest: +SKIP
    ListType(list<item: float>)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memscore.columns import ERROR, REPRESENTATION, is_internal, pixels_column

__all__ = ["REPRESENTATION", "EncodeImages", "representation_dataset"]


class EncodeImages:
    """Ray Data ``map_batches`` callable: decoded rows -> their encoder representations.

    Args:
        encoder: ``clip``, ``dinov2`` or ``siglip2``.
        weights: the encoder's folder or Hugging Face model id (None: the paper's), as
            ``encoders.load_encoder`` takes it.
        use_gpu: run the encoder on CUDA when torch sees a GPU.
        torch_threads: intra-op threads on the CPU (default: every core).
        storage_options: fsspec options for an ``s3://`` folder.
        batch_size: images per forward pass.

    ``__call__(table)`` takes the decode stage's output (its ``memscore_error`` and the pixel
    column ``pixels_column(encoder)``) and returns its columns but the internal ones, plus
    ``memscore_representation``. A row whose decode failed keeps its error and gets no vector;
    a vector that is not finite becomes the row's error.
    """

    def __init__(
        self,
        encoder: str,
        weights: str | None = None,
        *,
        use_gpu: bool = False,
        torch_threads: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        batch_size: int = 32,
    ) -> None:
        import torch

        from memscore.models.encoders import load_encoder
        from memscore.stages.predict import local_cores, pick_device

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.encoder = encoder
        self.batch_size = batch_size
        self.device = pick_device(use_gpu)
        if self.device.type == "cpu":
            torch.set_num_threads(torch_threads or local_cores())
        else:  # float32 representations, as the paper computed them
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        model, self.preprocess = load_encoder(encoder, weights, storage_options)
        self.model = model.to(self.device)

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        from memscore.models.encoders import representation
        from memscore.stages.predict import column_to_numpy

        ok = pc.is_null(table.column(ERROR)).to_numpy(zero_copy_only=False)
        errors = table.column(ERROR).to_pylist()
        rows = np.flatnonzero(ok)
        vectors = None
        if rows.size:
            pixels = column_to_numpy(table.column(pixels_column(self.encoder)))
            for start in range(0, rows.size, self.batch_size):
                chunk = rows[start : start + self.batch_size]
                batch = self.preprocess.to_tensor(pixels[chunk]).to(self.device)
                with torch.inference_mode():
                    out = representation(self.encoder, self.model, batch).float().cpu().numpy()
                if vectors is None:
                    vectors = np.zeros((table.num_rows, out.shape[1]), np.float32)
                vectors[chunk] = out
            bad = ok & ~np.isfinite(vectors).all(axis=1)
            for i in np.flatnonzero(bad):
                errors[i] = f"model failed: {self.encoder} gave a non-finite representation"
            ok &= ~bad
        dim = 0 if vectors is None else vectors.shape[1]
        if vectors is None:
            vectors = np.zeros((table.num_rows, 0), np.float32)
        lengths = np.where(ok, dim, 0)
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        column = pa.ListArray.from_arrays(
            pa.array(offsets),
            pa.array(vectors[ok].reshape(-1)),
            type=pa.list_(pa.float32()),
            mask=pa.array(~ok),
        )
        table = table.drop_columns([c for c in table.column_names if is_internal(c)])
        table = table.set_column(
            table.column_names.index(ERROR), ERROR, pa.array(errors, pa.string())
        )
        return table.append_column(REPRESENTATION, column)


def representation_dataset(
    dataset,
    config,
    manifest,
    encoder: str,
    weights: str | None,
    preprocess,
    *,
    use_gpu: bool,
    actors: int,
    batch_size: int,
    torch_threads: int | None = None,
):
    """``dataset`` (rows with the manifest's path column and ``memscore_row``) -> the same rows
    with ``memscore_representation``: the shared decode stage, then an ``EncodeImages`` pool.

    ``config`` carries the decode options (``TrainSAEConfig``, like ``FinetuneConfig`` for
    ``pipeline.decode_stage``); paths must be resolved already. ``actors`` actors, one GPU each
    where ``use_gpu``, else one CPU slot each (torch uses ``torch_threads`` or every core).
    """
    from ray.data import ActorPoolStrategy

    from memscore.stages.pipeline import decode_stage

    dataset = decode_stage(dataset, config, manifest, {encoder: preprocess}, None)
    return dataset.map_batches(
        EncodeImages,
        fn_constructor_kwargs={
            "encoder": encoder,
            "weights": weights,
            "use_gpu": use_gpu,
            "torch_threads": torch_threads,
            "storage_options": dict(config.storage_options),
            "batch_size": batch_size,
        },
        batch_format="pyarrow",
        batch_size=max(batch_size, config.rows_per_block),  # whole decoded blocks, as scoring
        compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
