"""``memscore features``: what each filter of a model sees, the dataset images that drive it, and
which filters carry memorability (the ResMem paper's Network Feature Analysis, fig. 13-15).

The run, in the order it happens:

1. **Activations**: a scoring run (``memscore.scoring.job.score``) into ``OUTPUT/activations``
   whose model stage also records each named layer's channels (``extract.FeatureImages``): the
   same sources, decoding, actors (GPUs where there are any), error rows, commits and
   ``--resume`` as ``memscore score``; each row's score equals ``memscore score``'s.
2. **Reductions**, as Ray tasks: one per output file folds its rows into each layer's exact
   top-k and moments (``reduce``), merged in the driver; one per layer and slice of channels
   ranks the channels' values over every row for their Spearman correlation with the score
   (and with ``--truth-column``), its slice sized to keep a task's memory bounded.
3. **Renderings** (``--visualize``/``--channels``), as Ray tasks, a batch of channels each, on
   GPUs where there are any (``render``); each PNG is checked against the channel's best
   dataset image.
4. **Sheets and report**: fig. 14-style contact sheets and ``report.md`` (``sheets``).

Outputs (names fixed, for other tools): ``top_images.parquet``, ``channels.parquet``,
``visualizations/<layer>/<channel>.png``, ``sheets/<layer>.png``, ``report.md`` and
``features.json`` (the run's summary).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memscore import storage
from memscore.columns import ERROR, ROW
from memscore.errors import MemscoreError
from memscore.feature_analysis.activations import check_layers, list_layers
from memscore.feature_analysis.config import ACTIVATIONS_FOLDER, FeaturesConfig
from memscore.feature_analysis.extract import FeatureImages, activation_column, activations_of
from memscore.feature_analysis.reduce import Moments, TopK, spearman
from memscore.runtime.ray_start import init_ray
from memscore.scoring.job import ModelStage, score
from memscore.sinks import open_sink
from memscore.sinks.lease import acquire_lease
from memscore.sources.readback import images_in_place

__all__ = ["features", "layers_of", "OWN_ENTRIES"]

TOP_IMAGES = "top_images.parquet"
CHANNELS = "channels.parquet"
VISUALIZATIONS = "visualizations"
SHEETS = "sheets"
REPORT = "report.md"
SUMMARY = "features.json"
#: What a features run writes at the top of its --output: what --overwrite may delete.
OWN_ENTRIES = (ACTIVATIONS_FOLDER, TOP_IMAGES, CHANNELS, VISUALIZATIONS, SHEETS, REPORT, SUMMARY)

#: Bytes of activations one Spearman task holds at once (its slice of channels x all rows,
#: as float64 ranks, three arrays): a task's memory stays bounded whatever the row count.
SPEARMAN_TASK_BYTES = 512 << 20


def _model_on_meta(name: str):
    """The model's modules without weights (the meta device: no memory, no initialisation)."""
    import torch

    from memscore.models import get_model

    with torch.device("meta"):
        return get_model(name, weights=None)


def _input_shape(name: str) -> tuple[int, int, int]:
    from memscore.models import get_model_weights

    return tuple(get_model_weights(name).DEFAULT.meta["input_size"])


def _views(name: str) -> int:
    """Rows of the model's internal batch per image (MemNet's legacy pipeline: ten crops)."""
    from memscore.models import get_model_weights
    from memscore.models.transforms import TenCropPreprocess

    return 10 if isinstance(get_model_weights(name).DEFAULT.transforms, TenCropPreprocess) else 1


def layers_of(model_name: str):
    """Every named module of ``model_name`` with its channels and output size for one image."""
    return list_layers(_model_on_meta(model_name), _input_shape(model_name))


def features(config: FeaturesConfig) -> dict[str, Any]:
    """Run the feature analysis ``config`` describes; returns the summary (``features.json``).

    Example:
        >>> import memscore
        >>> from memscore.feature_analysis.config import FeaturesConfig
        >>> summary = memscore.features(FeaturesConfig("examples/images", output="feats/",
        ...                                            layers=("conv4",), top_k=3))
        >>> summary["status"], summary["layers"]["conv4"]["channels"]
        ('complete', 384)
    """
    started = dt.datetime.now(dt.timezone.utc)
    config = config.validated()
    model = config.models[0]
    layers = config.all_layers()
    try:
        check_layers(layers, layers_of(model), model)
    except ValueError as exc:
        raise MemscoreError(str(exc)) from None
    _check_top_level(config)
    lease = acquire_lease(
        config.output, config.storage_options, take_over=config.resume or config.overwrite
    )
    try:
        return _features_holding(config, model, layers, started)
    finally:
        lease.release()


def _check_top_level(config: FeaturesConfig) -> None:
    """The features folder holds nothing but a features run's entries (and, without --resume
    or --overwrite, nothing at all)."""
    fs, path = storage.url_to_fs(config.output, config.storage_options)
    if not fs.exists(path):
        return
    entries = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
    entries = [e for e in entries if not e.startswith("_memscore")]
    foreign = sorted(e for e in entries if e not in OWN_ENTRIES)
    if foreign:
        raise MemscoreError(
            f"--output {config.output} holds {len(foreign)} entries memscore features did not "
            f"write (e.g. {foreign[0]}): choose an empty or new folder"
        )
    if entries and not (config.resume or config.overwrite):
        hint = (
            " it holds an unfinished run: give --resume to finish it,"
            if (SUMMARY not in entries)
            else ""
        )
        raise MemscoreError(
            f"--output {config.output} is not empty ({len(entries)} entries);{hint} give "
            f"--overwrite to replace it, or choose another folder"
        )


def _remove_results(config: FeaturesConfig) -> None:
    """This run's own results from an earlier run (not the activations: the scoring run keeps,
    resumes or overwrites those itself)."""
    fs, path = storage.url_to_fs(config.output, config.storage_options)
    for name in (TOP_IMAGES, CHANNELS, REPORT, SUMMARY, SHEETS) + (
        (VISUALIZATIONS,) if config.overwrite else ()
    ):
        target = f"{path.rstrip('/')}/{name}"
        if fs.exists(target):
            fs.rm(target, recursive=True)


def _features_holding(config, model: str, layers, started) -> dict[str, Any]:
    import ray

    from memscore.stages.predict import output_types

    score_config = config.score_config()
    scores = output_types(config.models, config.column_prefix)
    if len(scores) != 1:
        raise MemscoreError(
            f"--model {model} writes {len(scores)} columns; features need one score"
        )
    column = next(iter(scores))
    stage = ModelStage(
        actor=FeatureImages,
        kwargs={"layers": tuple(layers), "reduce": config.reduce, "views": _views(model)},
        columns={
            **scores,
            **{activation_column(layer): pa.list_(pa.float32()) for layer in layers},
        },
        identity={"layers": list(layers), "reduce": config.reduce},
    )
    clock = time.perf_counter()
    scored = score(score_config, stage)
    extract_s = time.perf_counter() - clock
    # only now: a command the scoring run refused (another run's activations) deletes nothing
    _remove_results(config)
    init_ray(config.address)

    activations = score_config.output
    sink = open_sink(activations, config.storage_options, "parquet")
    files = sink.files()
    key_column = _key_column(sink, files, config.path_column)
    clock = time.perf_counter()
    reduce_file = ray.remote(_reduce_file)
    parts = ray.get(
        [
            reduce_file.remote(
                activations, config.storage_options, path, layers, column, config.top_k, key_column
            )
            for path in files
        ]
    )
    rows = sum(n for _, n, _ in parts)
    merged = {}
    for layer in layers:
        channels = _channels_of(parts, layer)
        top, moments = TopK.empty(config.top_k, channels), Moments.empty(channels)
        for part, _, _ in parts:
            if layer in part:
                top = top.merge(part[layer][0])
                moments = moments.merge(part[layer][1])
        merged[layer] = (top, moments)
    rhos = _spearman_all(config, activations, files, layers, column, merged, rows)
    reduce_s = time.perf_counter() - clock

    # each file's task named the rows of its own top-k; the merged top-k's are among them
    keys = {row: key for _, _, named in parts for row, key in named.items()}
    top_table = _top_images_table(merged, keys, key_column)
    channel_table = _channels_table(merged, rhos, config.truth_column is not None)

    clock = time.perf_counter()
    rendered = _render(config, model, layers, merged, rhos)
    render_s = time.perf_counter() - clock
    channel_table = _with_renderings(channel_table, rendered)
    _write_table(config, TOP_IMAGES, top_table)
    _write_table(config, CHANNELS, channel_table)

    from memscore.feature_analysis.sheets import (
        report_text,
        sheet_images,
        sheet_png,
        shown_channels,
    )

    shown_rows = {
        int(row)
        for layer in layers
        for channel in shown_channels(layer, rhos[layer][0], rendered)
        for row in merged[layer][0].rows[channel]
        if row >= 0
    }
    views = sheet_images(
        config,
        model,
        shown_rows,
        keys,
        key_column,
        base_dir=scored.get("manifest_base_dir"),
        in_place=images_in_place(scored.get("manifest_kind"), key_column),
    )
    sheets = {}
    for layer in layers:
        png = sheet_png(layer, merged[layer][0], rhos[layer][0], rendered, keys, views)
        sheets[layer] = _write(config, f"{SHEETS}/{layer}.png", png)
    summary = {
        "status": "complete",
        "manifest": config.manifest,
        "output": config.output,
        "model": model,
        "weights": config.weights,
        "reduce": config.reduce,
        "top_k": config.top_k,
        "rows_in": scored.get("rows_in"),
        "rows_analysed": rows,
        "rows_with_errors": scored.get("rows_with_errors", scored.get("rows_error")),
        "errors_by_kind": scored.get("errors_by_kind"),
        "layers": {layer: {"channels": int(merged[layer][0].values.shape[0])} for layer in layers},
        "renderings": [{key: value for key, value in r.items() if key != "png"} for r in rendered],
        "steps": config.steps,
        "seed": config.seed,
        "seconds": {
            "activations": round(extract_s, 3),
            "reductions": round(reduce_s, 3),
            "renderings": round(render_s, 3),
        },
        "images_per_s": scored.get("images_per_s"),
        "activations_summary": storage.join(activations, "_memscore.json"),
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "sheets": sheets,
    }
    _write(config, REPORT, report_text(config, summary, channel_table, summary["renderings"]))
    _write(config, SUMMARY, json.dumps(summary, indent=2).encode())
    return summary


def _key_column(sink, files, path_column: str) -> str | None:
    """The column that names each image in the output: the manifest's path column, else a
    shard sample's ``__key__``; None where there is neither (rows are then named by
    memscore_row alone)."""
    if not files:
        return None
    names = sink.columns_of(files[0])
    for candidate in (path_column, "__key__"):
        if candidate in names:
            return candidate
    return None


def _channels_of(parts, layer: str) -> int:
    for part, _, _ in parts:
        if layer in part:
            return part[layer][0].values.shape[0]
    return 0


def _reduce_file(
    output: str, storage_options, path: str, layers, column: str, k: int, key_column: str | None
):
    """One output file's scored rows -> ({layer: (TopK, Moments)}, rows, {memscore_row: path
    or key} of the rows in any of its top-k: the final top-k's rows are among these, so the
    files are read once)."""
    sink = open_sink(output, storage_options, "parquet")
    names = [ROW, ERROR, column, *(activation_column(layer) for layer in layers)]
    table = sink.read_file(path, names + ([key_column] if key_column else []))
    table = table.filter(pc.is_null(table.column(ERROR)))
    if table.num_rows == 0:
        return {}, 0, {}
    rows = table.column(ROW).to_numpy()
    out = {}
    for layer in layers:
        values = activations_of(table, layer)
        out[layer] = (TopK.of(k, values, rows), Moments.of(values))
    named: dict[int, str] = {}
    if key_column:
        wanted = set(np.concatenate([top.rows.reshape(-1) for top, _ in out.values()]).tolist())
        for row, key in zip(rows.tolist(), table.column(key_column).to_pylist()):
            if row in wanted:
                named[row] = key
    return out, table.num_rows, named


def _spearman_slice(output, storage_options, files, layer, lo, hi, column, truth_column):
    """Spearman's rho of channels lo..hi of ``layer`` with the score (and the truth), over
    every scored row of ``files``."""
    sink = open_sink(output, storage_options, "parquet")
    names = [ERROR, column, activation_column(layer)]
    if truth_column:
        names.append(truth_column)
    values, scores, truths = [], [], []
    for path in files:
        table = sink.read_file(path, names)
        table = table.filter(pc.is_null(table.column(ERROR)))
        if table.num_rows == 0:
            continue
        values.append(activations_of(table, layer)[:, lo:hi])
        scores.append(table.column(column).to_numpy(zero_copy_only=False))
        if truth_column:
            truth = table.column(truth_column).cast(pa.float64(), safe=False)
            truths.append(truth.to_numpy(zero_copy_only=False))
    if not values:
        nan = np.full(hi - lo, np.nan)
        return lo, nan, nan
    x = np.concatenate(values)
    rho = spearman(x, np.concatenate(scores))
    rho_truth = np.full(hi - lo, np.nan)
    if truth_column:
        truth = np.concatenate(truths).astype(np.float64)
        known = np.isfinite(truth)
        rho_truth = spearman(x[known], truth[known])
    return lo, rho, rho_truth


def _spearman_all(config, output, files, layers, column, merged, rows) -> dict[str, tuple]:
    import ray

    if config.truth_column:
        names = open_sink(output, config.storage_options, "parquet").columns_of(files[0])
        if config.truth_column not in names:
            raise MemscoreError(
                f"--truth-column {config.truth_column!r}: the manifest has no such column"
            )
    task = ray.remote(_spearman_slice)
    pending = []
    for layer in layers:
        channels = merged[layer][0].values.shape[0]
        width = max(1, min(channels, SPEARMAN_TASK_BYTES // max(1, rows * 8 * 3)))
        for lo in range(0, channels, width):
            hi = min(channels, lo + width)
            pending.append(
                (
                    layer,
                    task.remote(
                        output,
                        config.storage_options,
                        files,
                        layer,
                        lo,
                        hi,
                        column,
                        config.truth_column,
                    ),
                )
            )
    out = {}
    for layer in layers:
        channels = merged[layer][0].values.shape[0]
        out[layer] = (np.full(channels, np.nan), np.full(channels, np.nan))
    for layer, ref in pending:
        lo, rho, rho_truth = ray.get(ref)
        out[layer][0][lo : lo + len(rho)] = rho
        out[layer][1][lo : lo + len(rho_truth)] = rho_truth
    return out


def _top_images_table(merged, keys, key_column) -> pa.Table:
    layer_col, channel_col, rank_col, row_col, key_col, value_col = [], [], [], [], [], []
    for layer, (top, _) in merged.items():
        channels, k = top.values.shape
        for channel in range(channels):
            for rank in range(k):
                row = int(top.rows[channel, rank])
                layer_col.append(layer)
                channel_col.append(channel)
                rank_col.append(rank)
                row_col.append(row)
                key_col.append(keys.get(row))
                value_col.append(float(top.values[channel, rank]))
    columns = {
        "layer": pa.array(layer_col, pa.string()),
        "channel": pa.array(channel_col, pa.int32()),
        "rank": pa.array(rank_col, pa.int32()),
        ROW: pa.array(row_col, pa.int64()),
    }
    if key_column is not None:
        columns[key_column] = pa.array(key_col, pa.string())
    columns["activation"] = pa.array(value_col, pa.float32())
    return pa.table(columns)


def _channels_table(merged, rhos, with_truth: bool) -> pa.Table:
    parts = []
    for layer, (_, moments) in merged.items():
        channels = len(moments.mean)
        rho, rho_truth = rhos[layer]
        parts.append(
            pa.table(
                {
                    "layer": pa.array([layer] * channels, pa.string()),
                    "channel": pa.array(np.arange(channels), pa.int32()),
                    "n": pa.array(np.full(channels, moments.n), pa.int64()),
                    "mean": pa.array(moments.mean, pa.float64()),
                    "std": pa.array(moments.std, pa.float64()),
                    "spearman": pa.array(rho, pa.float64(), from_pandas=True),
                    "spearman_truth": pa.array(
                        rho_truth if with_truth else np.full(channels, np.nan),
                        pa.float64(),
                        from_pandas=True,
                    ),
                }
            )
        )
    return pa.concat_tables(parts)


def _chosen_channels(config, layers, rhos) -> dict[str, list[int]]:
    """--channels, else per layer the --visualize channels whose |Spearman| is largest."""
    if config.channels:
        return config.rendered_channels()
    if config.visualize == 0:
        return {}
    chosen = {}
    for layer in layers:
        rho = np.nan_to_num(np.abs(rhos[layer][0]), nan=-1.0)
        order = np.lexsort((np.arange(len(rho)), -rho))  # strongest first, ties by channel
        chosen[layer] = [int(c) for c in order[: config.visualize]]
    return chosen


def _render(config, model, layers, merged, rhos) -> list[dict[str, Any]]:
    """Render the chosen channels as Ray tasks, a batch of channels each; write their PNGs."""
    import ray

    from memscore.feature_analysis.render_task import CHANNELS_PER_TASK, render_batch

    chosen = _chosen_channels(config, layers, rhos)
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(num_gpus=1 if gpus >= 1 else 0)(render_batch)
    pending = []
    for layer, channels in chosen.items():
        count = merged[layer][0].values.shape[0]
        for channel in channels:
            if not 0 <= channel < count:
                raise MemscoreError(
                    f"--channels {layer}:{channel}: {layer} has channels 0..{count - 1}"
                )
        for start in range(0, len(channels), CHANNELS_PER_TASK):
            batch = channels[start : start + CHANNELS_PER_TASK]
            best = [float(merged[layer][0].values[c, 0]) for c in batch]
            pending.append(
                task.remote(
                    model,
                    config.weights,
                    config.storage_options,
                    layer,
                    batch,
                    best,
                    steps=config.steps,
                    seed=config.seed + start,
                    reduce=config.reduce,
                    use_gpu=gpus >= 1,
                )
            )
    rendered = []
    for ref in pending:
        for result in ray.get(ref):
            # (module names are dotted identifiers: a layer's name is a folder's name)
            result["file"] = _write(
                config, f"{VISUALIZATIONS}/{result['layer']}/{result['channel']}.png", result["png"]
            )
            rendered.append(result)  # with its PNG's bytes, which the sheets show
    return rendered


def _with_renderings(table: pa.Table, rendered) -> pa.Table:
    by_key = {(r["layer"], r["channel"]): r for r in rendered}
    layers = table.column("layer").to_pylist()
    channels = table.column("channel").to_pylist()
    got = [by_key.get((layer, c)) for layer, c in zip(layers, channels)]
    table = table.append_column(
        "rendering_activation",
        pa.array([r["activation"] if r else None for r in got], pa.float64()),
    )
    return table.append_column(
        "rendering_factor", pa.array([r["factor"] if r else None for r in got], pa.float64())
    )


def _write(config, relative: str, data: bytes) -> str:
    """Write ``data`` to ``relative`` under --output, whole or not at all; -> its path."""
    return storage.write_under(config.output, relative, data, config.storage_options)


def _write_table(config, name: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _write(config, name, buffer.getvalue())
