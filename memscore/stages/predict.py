"""Model stage: decoded pixel batches in, each model's output columns out.

Most models write one float32 score column; a model whose weights' meta declares
``output_columns`` (the ``<encoder>-traces`` models: six list<float32> columns, one value per
layer) returns a dict of column -> values from its forward, and each becomes a column of that
type (``memscore.models._api.output_columns_of``).

``ScoreImages`` is the callable class Ray Data runs as an actor pool: the model is built once,
in ``__init__`` on the actor (never in the driver), and ``__call__`` scores a pyarrow batch under
``torch.inference_mode()``. It works without Ray too: ``ScoreImages(("resmem",))(table)``.
Rows whose decode failed (``memscore_error`` not null) are not run through the model; their score is null.

Ray hands the stage whole decoded blocks (``--rows-per-block`` rows) and ``__call__`` runs the
forward in chunks of ``batch_size`` decodable rows: Ray's own batching would cut each block into
``batch_size``-row slices, copying their pixel columns, with a call per slice. Measured on cheap
rows (all errors, no forward; ``benchmarks/SCALE_RESULTS.md``), the per-slice overhead was a
large share of the actor's time.

The models and their input batches are in ``torch.channels_last`` (NHWC) memory, on the CPU and
on CUDA: oneDNN's and cuDNN's convolutions run faster on it than on NCHW, and the decoded NHWC
pixels are in that layout already. ResMem's forward, CPU time on one thread of a shared 2-core
VM: 1.22x as fast in batches of 32 (0.286 -> 0.234 s per image), 1.05x in batches of 1 and 8;
scores moved by at most 1.2e-7. On CUDA a batch is built in pinned host memory and copied
asynchronously.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memscore.columns import (
    ERROR as ERROR_COLUMN,
    HEIGHT as HEIGHT_COLUMN,
    MODEL as MODEL_COLUMN,
    WIDTH as WIDTH_COLUMN,
    is_internal,
    pixels_column,
    score_column,
)
from memscore.faults import maybe_inject
from memscore.saliency.runner import MapRunner, MapSettings, map_column

__all__ = [
    "ScoreImages",
    "PRECISIONS",
    "MODEL_COLUMN",
    "output_columns",
    "output_types",
    "model_weights",
    "pick_device",
    "load_model",
    "maps_refusal",
    "local_cores",
]

log = logging.getLogger(__name__)


#: The model stage's arithmetic. fp32 is the default: the published packages' scores. The
#: others are faster on GPUs and move scores (measured on the CPU with the published ResMem
#: weights, 10 crops, benchmarks/GPU_RESULTS.md: bf16 up to 3e-3, fp16 up to 6.3e-4; TF32
#: exists on CUDA only); a GPU run of benchmarks/score_gpu.py gives their speed.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def output_types(
    models: tuple[str, ...], column_prefix: str = "", maps: bool = False
) -> dict[str, pa.DataType]:
    """The columns the models write, name (after ``column_prefix``) -> Arrow type, in output
    order: each model's columns as its weights declare them (``output_columns_of``), then with
    ``maps`` each score's map column (``map_column``)."""
    from memscore.models import get_model_weights
    from memscore.models._api import output_columns_of

    types = {}
    for name in models:
        for column, kind in output_columns_of(get_model_weights(name).DEFAULT.meta).items():
            types[score_column(column, column_prefix)] = _ARROW_TYPES[kind]()
    if maps:
        types.update({map_column(column): pa.list_(pa.float32()) for column in list(types)})
    return types


def output_columns(
    models: tuple[str, ...], column_prefix: str = "", maps: bool = False
) -> list[str]:
    """The columns memscore adds to every row, in output order: the models' columns (one score
    each, or a traces model's six, after ``column_prefix``; with ``maps`` each score's map),
    then the bookkeeping columns."""
    return [
        *output_types(models, column_prefix, maps),
        ERROR_COLUMN,
        MODEL_COLUMN,
        WIDTH_COLUMN,
        HEIGHT_COLUMN,
    ]


_ARROW_TYPES = {"float32": pa.float32, "list<float32>": lambda: pa.list_(pa.float32())}


def model_weights(models: tuple[str, ...], weights) -> dict[str, str | None]:
    """Each model's ``--weights``: ``weights`` is None (every model's default), one value for a
    single model, or a mapping of model name -> value (others: their default)."""
    if weights is None:
        return {name: None for name in models}
    if isinstance(weights, str):
        if len(models) != 1:
            raise ValueError(
                f"one --weights value for {len(models)} models: give each its own "
                f"as MODEL=WEIGHTS,MODEL=WEIGHTS"
            )
        return {models[0]: weights}
    unknown = sorted(set(weights) - set(models))
    if unknown:
        raise ValueError(
            f"--weights names {', '.join(unknown)}, which is not among the models "
            f"scored ({', '.join(models)})"
        )
    return {name: weights.get(name) for name in models}


def pick_device(want_gpu: bool):
    """cuda when asked for and visible to torch; otherwise the CPU, with a warning if asked."""
    import torch

    if want_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    if want_gpu:
        log.warning(
            "this actor was given a GPU by Ray but torch sees none (CUDA_VISIBLE_DEVICES=%s); "
            "scoring on the CPU",
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
    return torch.device("cpu")


def local_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def maps_refusal(model: str, settings: MapSettings | None = None) -> str | None:
    """Why ``model`` cannot have ``settings``' maps (default: ``MapSettings()``), in one line,
    or None where it can: what ``--maps`` and ``memscore serve`` ask of each model."""
    from memscore.models import get_model_weights
    from memscore.saliency.runner import check_maps

    try:
        check_maps(settings or MapSettings(), model, get_model_weights(model).DEFAULT.meta)
    except ValueError as exc:
        return str(exc)
    return None


def load_model(name: str, given, storage_options=None):
    """Registered model ``name`` with the weights a run names (``given``: a member's name, a
    checkpoint, a traces folder), on the CPU in eval mode -> (module, the weights member whose
    preprocessing and outputs it has). Every stage that runs a run's model builds it here."""
    from memscore.models import get_model
    from memscore.models._api import FolderWeights
    from memscore.models.registry import is_checkpoint, weights_for

    chosen = weights_for(name, given, storage_options)
    if isinstance(chosen, FolderWeights):  # a traces model: the folder decides all
        model = get_model(name, weights=chosen, storage_options=storage_options)
    elif is_checkpoint(name, given):
        # the member picks the pipeline (MemNet's mode); the checkpoint the tensors
        model = get_model(name, weights=given, storage_options=storage_options)
    else:
        model = get_model(name, weights=chosen)
    return model, chosen


class ScoreImages:
    """Score a decoded batch with one or more registered models.

    Args:
        models: registered model names, e.g. ``("resmem",)``.
        weights: for a single model, its weights member name or a checkpoint file (local or
            URL), or for a traces model a Hugging Face model id or folder; for several, a
            mapping of model name -> such a value (default: each model's DEFAULT; see
            ``model_weights``).
        use_gpu: score on CUDA when torch sees a GPU.
        torch_threads: intra-op threads on the CPU (default: every core of the machine; Ray
            would otherwise pin an actor that asked for one CPU to one thread).
        storage_options: fsspec options for a remote checkpoint.
        column_prefix: put before each score column's name (``pred_`` -> ``pred_memorability``).
        batch_size: at most this many rows per forward pass; a call's decodable rows are
            scored in chunks of it, in order (None: all of them at once).
        precision: "fp32" (the published scores), "tf32" (CUDA's TF32 matrix units for
            float32 work), "bf16" or "fp16" (``torch.autocast``); see ``PRECISIONS``.
        maps: each score's memorability map too (``memscore.saliency``), as a
            ``<score column>_map`` column; the scores are the same as without.

    Returns (from ``__call__``, on a table from ``DecodeImages``): the table without its pixel
    columns, with each model's score column(s) and ``memscore_model``; a row with an error
    keeps it and gets null scores.

    Example:
        >>> import pyarrow as pa
        >>> from memscore.stages.decode import DecodeImages
        >>> from memscore.models import get_model_weights
        >>> preprocess = {"resmem": get_model_weights("resmem").DEFAULT.transforms}
        >>> decode = DecodeImages("path", preprocess)
        >>> decoded = decode(pa.table({"path": ["examples/images/chelsea.png", "nowhere.jpg"]}))
        >>> scored = ScoreImages(("resmem",))(decoded)
        >>> scored.column_names  # doctest: +NORMALIZE_WHITESPACE
        ['path', 'memorability', 'memscore_error', 'memscore_model', 'memscore_width',
         'memscore_height']
        >>> [score is None for score in scored.column("memorability").to_pylist()]
        [False, True]
    """

    def __init__(
        self,
        models: tuple[str, ...],
        weights: str | Mapping[str, str | None] | None = None,
        *,
        use_gpu: bool = False,
        torch_threads: int | None = None,
        storage_options: dict | None = None,
        column_prefix: str = "",
        batch_size: int | None = None,
        precision: str = "fp32",
        maps: MapSettings | None = None,
    ) -> None:
        import torch

        from memscore.models._api import output_columns_of

        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.batch_size = batch_size
        self._autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

        self.device = pick_device(use_gpu)
        if self.device.type == "cpu":
            torch.set_num_threads(torch_threads or local_cores())
        else:
            # PyTorch lets cuDNN run float32 convolutions in TF32 by default (10-bit mantissa):
            # faster, but not the published float32 scores, which are the default here.
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        self.models = tuple(models)
        self._runners = []
        self._map_layers: dict[str, tuple[str, ...]] = {}
        for name, given in model_weights(self.models, weights).items():
            model, chosen = load_model(name, given, storage_options)
            model = model.to(self.device, memory_format=torch.channels_last)
            # model output key -> (output column, Arrow type)
            columns = {
                key: (score_column(key, column_prefix), _ARROW_TYPES[kind]())
                for key, kind in output_columns_of(chosen.meta).items()
            }
            self._map_layers[name] = tuple(chosen.meta.get("map_layers", ()))
            runner = (name, chosen.transforms, columns, model)
            self._runners.append(runner if maps is None else self._mapped(runner, maps))
        self._column_prefix = column_prefix
        self._added = output_columns(self.models, column_prefix, maps is not None)

    def _mapped(self, runner, maps: MapSettings):
        """A runner whose forward also gives each image's map (``saliency.runner``)."""
        name, transforms, columns, model = runner
        ((key, (column, _)),) = columns.items()  # one score: the config checked it
        columns = {**columns, map_column(key): (map_column(column), pa.list_(pa.float32()))}
        mapped = MapRunner(model, key, map_column(key), maps, self._map_layers[name])
        return (name, transforms, columns, mapped)

    def with_maps(self, maps: MapSettings) -> ScoreImages:
        """This stage with maps too, its models shared (no second copy of the weights):
        ``memscore serve`` answers ``maps=true`` requests with it."""
        import copy

        other = copy.copy(self)
        other._runners = [self._mapped(runner, maps) for runner in self._runners]
        other._added = output_columns(self.models, self._column_prefix, True)
        return other

    def __call__(self, table: pa.Table) -> pa.Table:
        maybe_inject("predict")  # test-only fault hook: a no-op unless MEMSCORE_INJECT_FAULT is set
        import torch

        errors = table.column(ERROR_COLUMN)
        ok = pc.is_null(errors).to_numpy(zero_copy_only=False)
        new_errors = errors.to_pylist()
        values: dict[str, tuple[np.ndarray | None, pa.DataType]] = {}
        for name, preprocess, columns, model in self._runners:
            rows = np.flatnonzero(ok)
            outputs: dict[str, np.ndarray | None] = {key: None for key in columns}
            step = self.batch_size or max(1, rows.size)
            if rows.size:
                block = column_to_numpy(table.column(pixels_column(name)))
            for start in range(0, rows.size, step):
                chunk = rows[start : start + step]
                with (
                    torch.inference_mode(),
                    torch.autocast(
                        self.device.type, dtype=self._autocast, enabled=self._autocast is not None
                    ),
                ):
                    batch = self._to_device(preprocess, block[chunk])
                    result = model(batch)
                if not isinstance(result, dict):  # a scoring model: one score per image
                    result = {next(iter(columns)): result.reshape(-1)}
                for key, value in result.items():
                    value = value.float().cpu().numpy().reshape(len(chunk), -1)
                    if outputs[key] is None:  # one row per table row, zeros where unscored
                        outputs[key] = np.zeros((table.num_rows, value.shape[1]), np.float32)
                    outputs[key][chunk] = value
            bad = np.zeros_like(ok)
            for out in outputs.values():
                if out is not None:
                    bad |= ok & ~np.isfinite(out).all(axis=1)
            for i in np.flatnonzero(bad):  # a model must never emit NaN as a score
                new_errors[i] = f"model failed: {name} gave a non-finite score"
            ok &= ~bad
            for key, (column, arrow_type) in columns.items():
                values[column] = (outputs[key], arrow_type)
        # A row with an error has no score from any model, so one error column holds for all:
        # every model's columns are masked with the rows left after the last model.
        for column, (out, arrow_type) in values.items():
            table = _set(table, column, _column(out, arrow_type, ok))
        table = _set(table, ERROR_COLUMN, pa.array(new_errors, type=pa.string()))
        table = _set(
            table,
            MODEL_COLUMN,
            pa.array([",".join(self.models)] * table.num_rows, type=pa.string()),
        )
        # pixels, and a WebDataset sample's image bytes: internal, never written
        table = table.drop_columns([c for c in table.column_names if is_internal(c)])
        return table.select([c for c in table.column_names if c not in self._added] + self._added)

    def _to_device(self, preprocess, pixels: np.ndarray):
        """uint8 NHWC pixels -> the model's float input on ``self.device``, channels_last.

        On CUDA the batch goes through pinned (page-locked) host memory, so the copy is a DMA
        that runs asynchronously: ``.cpu()`` on the scores, on the same stream, waits for it.
        """
        import torch

        batch = preprocess.to_tensor(pixels, memory_format=torch.channels_last)
        if self.device.type != "cuda":
            return batch
        return batch.pin_memory().to(self.device, non_blocking=True)


def _column(values: np.ndarray | None, arrow_type: pa.DataType, ok: np.ndarray) -> pa.Array:
    """One output column: ``values`` ``[rows, k]`` (None: no row was scored), null where not
    ``ok``; float32 takes ``k == 1``, list<float32> a list of the ``k`` values per row."""
    rows = ok.size
    if pa.types.is_list(arrow_type):
        if values is None:
            values = np.zeros((rows, 0), np.float32)
        lengths = np.where(ok, values.shape[1], 0)
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        return pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(values[ok].reshape(-1)), type=arrow_type, mask=pa.array(~ok)
        )
    scores = np.zeros(rows, np.float32) if values is None else values[:, 0]
    return pa.array(scores, type=arrow_type, mask=~ok)


def column_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    if column.num_chunks == 1:  # a whole decoded block: a view, no copy of its pixels
        return column.chunk(0).to_numpy()
    return np.concatenate([chunk.to_numpy() for chunk in column.chunks])


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
