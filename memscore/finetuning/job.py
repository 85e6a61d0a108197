"""Fine-tuning: labelled manifest -> splits -> the scoring job's decode stage -> Ray Train.

``finetune(config)`` is what ``memscore finetune`` and ``jobs/finetune.py`` call. Everything it
writes goes to ``OUTPUT/NAME/``::

    splits/{train,validation,test}.parquet   the manifest's rows (every column, image paths
                                             resolved) with memscore_row, memscore_split
                                             and labelled_row (memscore_row again, under a
                                             name that passes through scoring)
    splits/{validation,test}_images.parquet  the same without the label column and the
                                             memscore_ columns (scoring adds its own), to score
    splits/test_labels.parquet               the test rows without the memscore_ columns: the
                                             ground truth `memscore evaluate` reads
    ray_train/                               Ray Train's run: per-epoch checkpoints (resume)
    best/                                    the best epoch's memscore checkpoint, scoreable
                                             with `memscore score --weights OUTPUT/NAME/best`
    history.json                             metrics of every epoch so far
    test_scores/, test_report/               the best model scored on the test split by
                                             `memscore score`, and `memscore evaluate`'s report
    finetune.json                            the run summary, written last

For images inside Parquet (``Source.images_in_place``: img2dataset's output, a Hugging Face
dataset) the split files hold no images and no paths: the driver reads the rows without their
image column, names each by ``memscore_row`` (``file << 32 | row``, also what its split is
hashed from), and the source's own Ray read tasks read each split's images in place, keeping
only that split's rows (``Source.dataset_of_rows``); the test split's images are then written
once to ``splits/test_images/`` (``labelled_row`` and the image's bytes: the only copy of
images the run makes) for ``memscore score`` to score.

Images go through the same manifest reader and the same decode stage (``pipeline.decode_batch``)
as scoring, once: the decoded 256x256 arrays are materialised in Ray's object store and every
epoch reads them from there. The driver only plans, counts and reports; the decoding runs as
Ray tasks and the training on Ray Train workers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memscore import storage
from memscore.columns import ERROR as ERROR_COLUMN, ROW, SPLIT, pixels_column
from memscore.errors import MemscoreError, counted, first_line
from memscore.finetuning.config import FinetuneConfig
from memscore.finetuning.splits import (
    SPLITS,
    assign_splits,
    normalise_split_column,
    parse_fractions,
)
from memscore.finetuning.train_loop import LABEL, TrainSpec
from memscore.row_errors import ImageDecodeError
from memscore.sources.manifest import Manifest, open_manifest
from memscore.stages.fetch import resolve_path
from memscore.training.options import training_start
from memscore.training.run_folder import (
    abandon_run_folder,
    check_run_folder,
    json_default as _json_default,
    read_json as _read_json,
    start_run_folder,
)

__all__ = ["finetune", "ROW", "SPLIT", "LABELLED_ROW", "plan_start"]

SUMMARY_FILE = "finetune.json"
_PATH = "__memscore_path"  # the resolved image path, kept beside the pixels to name failures
# memscore_row under a name that passes through `memscore score` (whose own memscore_row is the
# row's place in the file it scores): in every split file, the key that joins scores to labels.
LABELLED_ROW = "labelled_row"
# A run whose best validation Spearman stays below this ends with a warning: the model ranks
# the validation images hardly better than chance (or worse), whatever its loss did.
LOW_SPEARMAN = 0.1
_TRAINING_DEFAULTED = ("optimizer", "lr", "batch_size")


def plan_start(config: FinetuneConfig) -> tuple[str, str, dict]:
    """(start, pipeline, builder kwargs): the starting weights, and the weights member whose
    preprocessing the training uses (a checkpoint's own, else the model's DEFAULT if it is a
    single-crop pipeline, else its first single-crop member: MemNet trains its modern one)."""
    from memscore.models import WeightsNotFoundError, get_model_weights
    from memscore.models.checkpoint import read_checkpoint_info
    from memscore.models.registry import check_checkpoint, is_checkpoint
    from memscore.models.transforms import ImagePreprocess

    enum_cls = get_model_weights(config.model)
    start, member = config.weights, None
    # "scratch" and the enum's member names are names; anything else is a checkpoint
    checkpoint = start not in (None, "scratch") and is_checkpoint(config.model, start)
    if checkpoint:
        try:
            check_checkpoint(config.model, start, config.storage_options)
        except ValueError as exc:
            raise MemscoreError(first_line(exc)) from None
    try:
        if checkpoint:
            info = read_checkpoint_info(start, config.storage_options)
            if info is not None:
                if info["model"] != config.model:
                    raise MemscoreError(
                        f"--weights {start} is a checkpoint of {info['model']!r}, "
                        f"not {config.model!r}"
                    )
                member = enum_cls.verify(info["weights"])
        elif start not in (None, "scratch"):
            member = enum_cls.verify(start)
    except (ValueError, FileNotFoundError) as exc:
        raise MemscoreError(f"--weights: {exc}") from None
    if member is None:
        candidates = [enum_cls.DEFAULT] + [m for m in enum_cls if m is not enum_cls.DEFAULT]
        member = next((m for m in candidates if isinstance(m.transforms, ImagePreprocess)), None)
    if member is None or not isinstance(member.transforms, ImagePreprocess):
        raise MemscoreError(
            f"{config.model}: the weights {getattr(member, 'name', None)} use a "
            f"pipeline memscore cannot train (single centre-crop ones only)"
        )
    if start is None:  # the published weights where there are some
        try:
            member.path()
            start = member.name
        except WeightsNotFoundError:
            start = "scratch"
    kwargs: dict = {}
    if config.model == "m3m" and start == "scratch":
        # M3M has no published weights; a new one starts as ResMem (its published branches and
        # head) with the published FCN segmentation branch, which must be on this machine.
        from memscore.models.m3m import locate_fcn_weights

        try:
            fcn = locate_fcn_weights()
        except FileNotFoundError as exc:
            raise MemscoreError(first_line(exc)) from None
        # the path found here goes to the workers, which may not see this process's environment
        start, kwargs = "resmem-init", {"init_from_resmem": True, "segmentation_weights": fcn}
    return start, member.name, kwargs


def _identity(config: FinetuneConfig, manifest: Manifest, pipeline: str) -> dict[str, Any]:
    """What makes a run this run; a re-run with another identity must not resume it. Epochs and
    patience may change, so a finished run can be trained further under the same name."""
    from memscore.sources.manifest import manifest_fingerprint

    keep = (
        "manifest",
        "label_column",
        "model",
        "mode",
        "weights",
        "path_column",
        "split_column",
        "split_fractions",
        "split_seed",
        "batch_size",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "augment",
        "seed",
        "workers",
    )
    identity = {key: getattr(config, key) for key in keep}
    identity.update(manifest_fingerprint=manifest_fingerprint(manifest), pipeline=pipeline)
    return identity


def _check_run_dir(config: FinetuneConfig, run_dir: str, identity: dict) -> str:
    """'fresh', 'resume' or 'complete' (nothing written); refuses to mix two different runs in
    one folder."""
    return check_run_folder(
        run_dir,
        identity,
        job="finetune",
        summary_file=SUMMARY_FILE,
        is_complete=lambda summary: (
            summary.get("epochs_requested", 0) >= config.epochs
            or bool(summary.get("early_stopped"))
        ),
        overwrite=config.overwrite,
        storage_options=config.storage_options,
    )


def _label_values(column: pa.ChunkedArray, config: FinetuneConfig) -> tuple[np.ndarray, list]:
    """The labels as float64 (NaN where unusable) and, per row, what is wrong with its label
    (None when nothing). A text column (a CSV column Arrow read as text because some values are
    not numbers, "abc" beside "0.71") is parsed value by value."""
    try:
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(float)
        values = np.where(pc.is_null(column).to_numpy(zero_copy_only=False), np.nan, values)
        problems = [None] * len(values)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if not (
            pa.types.is_string(column.type)
            or pa.types.is_large_string(column.type)
            or pa.types.is_binary(column.type)
            or pa.types.is_large_binary(column.type)
        ):
            raise MemscoreError(
                f"{config.manifest}: --label-column {config.label_column!r} is "
                f"{column.type}, not numbers"
            ) from None
        parsed = [_parse_label(value) for value in column.to_pylist()]
        values = np.array([value for value, _ in parsed], dtype=float)
        problems = [problem for _, problem in parsed]
    for i in np.flatnonzero(~np.isfinite(values)):
        if problems[i] is None:
            problems[i] = "no label" if np.isnan(values[i]) else "non-finite label"
    return values, problems


def _parse_label(value: Any) -> tuple[float, str | None]:
    import pyarrow.csv

    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    # what Arrow reads as null in a column of numbers ("", "n/a", "NA", "null" ...) is no
    # label here too, whether or not another row's "abc" made the column text
    if value is None or value.strip() in pyarrow.csv.ConvertOptions().null_values:
        return math.nan, "no label"
    try:
        return float(value), None
    except ValueError:
        return math.nan, "non-numeric label"


def _labelled_table(config: FinetuneConfig, manifest: Manifest) -> tuple[pa.Table, dict, dict]:
    """The manifest's labelled rows with their row ids, resolved paths, float64 labels (in the
    label column) and splits; the counts of rows left out for want of a usable label; and those
    rows' problems per split, ``{split: {kind: [rows, example path]}}``."""
    table = pa.concat_tables(manifest.read_all(), promote_options="permissive")
    values, problems = _label_values(table.column(config.label_column), config)
    table = table.set_column(
        table.column_names.index(config.label_column),
        config.label_column,
        pa.array(values, pa.float64()),
    )
    table = table.append_column(ROW, manifest.row_ids(table.num_rows))
    if manifest.images_in_place:
        # no path: a row is hashed into its split, and named in messages, by its id
        paths = [str(row) for row in table.column(ROW).to_pylist()]
        resolved = [f"{ROW} {row}" for row in paths]
    else:
        paths = table.column(manifest.path_column).to_pylist()
        table = table.set_column(
            table.column_names.index(manifest.path_column),
            manifest.path_column,
            pa.array([_resolved(p, manifest.base_dir) for p in paths], pa.string()),
        )
        resolved = table.column(manifest.path_column).to_pylist()
    if config.split_column:
        try:
            splits = normalise_split_column(table.column(config.split_column), config.split_column)
        except ValueError as exc:
            raise MemscoreError(f"{config.manifest}: {exc}") from None
    else:
        # the hash is of the path as the manifest gives it, so moving the images does not
        # move rows between splits
        splits = assign_splits(
            pa.array(paths, pa.string()), parse_fractions(config.split_fractions), config.split_seed
        )
    table = table.append_column(SPLIT, splits)
    usable = np.array([problem is None for problem in problems], dtype=bool)
    kinds: dict[str, int] = {}
    by_split: dict[str, dict[str, list]] = {split: {} for split in SPLITS}
    split_names = table.column(SPLIT).to_pylist()
    for i in np.flatnonzero(~usable):
        kinds[problems[i]] = kinds.get(problems[i], 0) + 1
        _tally(by_split[split_names[i]], problems[i], resolved[i])
    counts = {
        "rows_in": table.num_rows,
        "rows_without_label": int((~usable).sum()),
        "label_problem_kinds": kinds,
    }
    return table.filter(pa.array(usable)), counts, by_split


def _tally(problems: dict[str, list], kind: str, example: Any, rows: int = 1) -> None:
    entry = problems.setdefault(kind, [0, example])
    entry[0] += rows


def _nothing_to_train(
    config: FinetuneConfig,
    rows: dict[str, int],
    usable: dict[str, int],
    problems: list[dict[str, list]],
) -> MemscoreError:
    """The one-line error of a run left with no training or no validation rows: how many rows
    each split had and kept, and the commonest reason rows were dropped, with an example path
    as memscore resolved it (a relative path resolves against the manifest's folder)."""
    tally: dict[str, list] = {}
    for split_problems in problems:
        for kind, (count, example) in split_problems.items():
            _tally(tally, kind, example, count)
    empty = " and ".join(
        f"no {split} rows" for split in ("train", "validation") if not usable[split]
    )
    text = (
        f"{config.manifest}: {empty} to fine-tune with: {usable['train']} of "
        f"{rows['train']} train and {usable['validation']} of {rows['validation']} "
        f"validation rows are usable"
    )
    if tally:
        kind, (count, example) = max(tally.items(), key=lambda item: item[1][0])
        text += f"; commonest problem: {kind} ({counted(count, 'row')}), e.g. {example}"
    else:
        text += " (the split gave none: check --split-column or --split-fractions)"
    return MemscoreError(text)


def _resolved(path: Any, base_dir: str | None) -> Any:
    try:
        return resolve_path(path, base_dir)
    except ImageDecodeError:
        return path  # the decode stage reports it as the row's error


def _write_splits(
    table: pa.Table, config: FinetuneConfig, run_dir: str, with_images: bool = True
) -> dict[str, str]:
    """The split files; without ``{split}_images`` where the rows hold no image paths
    (``with_images`` False: ``_write_test_images`` writes the test split's images)."""
    fs, path = storage.url_to_fs(run_dir, config.storage_options)
    if not storage.is_url(run_dir):
        fs.makedirs(f"{path}/splits", exist_ok=True)
    files = {}
    table = table.append_column(LABELLED_ROW, table.column(ROW))
    for split in SPLITS:
        part = table.filter(pc.equal(table.column(SPLIT), split))
        for name, data in (
            (split, part),
            (f"{split}_images", part.drop_columns([config.label_column, ROW, SPLIT])),
            (f"{split}_labels", part.drop_columns([ROW, SPLIT])),
        ):
            if name in ("train_images", "train_labels", "validation_labels"):
                continue
            if name.endswith("_images") and not with_images:
                continue
            with fs.open(f"{path}/splits/{name}.parquet", "wb") as f:
                pq.write_table(data, f)
            files[name] = storage.join(run_dir, "splits", f"{name}.parquet")
    return files


def _keep_for_training(
    table: pa.Table, label_column: str, pixels: str, path_column: str
) -> pa.Table:
    if path_column in table.column_names:
        names = table.column(path_column)
    else:  # images inside Parquet: a row is named by its id
        names = pc.binary_join_element_wise(f"{ROW} ", pc.cast(table.column(ROW), pa.string()), "")
    return pa.table(
        {
            ROW: table.column(ROW),
            LABEL: pc.cast(table.column(label_column), pa.float32()),
            pixels: table.column(pixels),
            ERROR_COLUMN: table.column(ERROR_COLUMN),
            _PATH: names,
        }
    )


def _with_labels(table: pa.Table, ids, labels, label_column: str, image: str) -> pa.Table:
    """Rows read in place -> their id, the driver's float label, their error and image: the
    label as the driver parsed it (a text column's values parsed one by one), found by id."""
    rows = table.column(ROW).to_numpy()
    found = labels[np.searchsorted(ids, rows)]
    return pa.table(
        {
            ROW: table.column(ROW),
            label_column: pa.array(found, pa.float64()),
            ERROR_COLUMN: table.column(ERROR_COLUMN),
            image: table.column(image),
        }
    )


def _drop_failed(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table.column(ERROR_COLUMN))).drop_columns([_PATH])


def _decoded(config: FinetuneConfig, split_file: str, manifest: Manifest, preprocess):
    """A split's rows decoded once by the scoring job's decode stage, held in the object store."""
    import ray.data

    from memscore.stages.pipeline import decode_stage

    if manifest.images_in_place:
        # the split's ids and labels are small: read back here, the images by Ray tasks
        fs, path = storage.url_to_fs(split_file, config.storage_options)
        with fs.open(path, "rb") as f:
            labels = pq.read_table(f, columns=[ROW, config.label_column])
        order = np.argsort(labels.column(ROW).to_numpy())
        ids = labels.column(ROW).to_numpy()[order]
        image = manifest.image_reading()["bytes_column"]
        dataset = (
            manifest.dataset_of_rows(pa.array(ids, pa.int64()))
            .map_batches(
                _with_labels,
                fn_kwargs={
                    "ids": ids,
                    "labels": labels.column(config.label_column).to_numpy()[order],
                    "label_column": config.label_column,
                    "image": image,
                },
                batch_format="pyarrow",
            )
            .repartition(target_num_rows_per_block=config.rows_per_block)
        )
    else:
        paths, filesystem = storage.for_pyarrow(split_file, config.storage_options)
        dataset = (
            ray.data.read_parquet(paths, filesystem=filesystem)
            .select_columns([manifest.path_column, ROW, config.label_column])
            .repartition(target_num_rows_per_block=config.rows_per_block)
        )
    # the split files hold resolved paths: no base folder
    dataset = decode_stage(dataset, config, manifest, {config.model: preprocess}, None)
    dataset = dataset.map_batches(
        _keep_for_training,
        fn_kwargs={
            "label_column": config.label_column,
            "pixels": pixels_column(config.model),
            "path_column": manifest.path_column,
        },
        batch_format="pyarrow",
    )
    return dataset.materialize()


def _image_errors(dataset) -> dict[str, list]:
    """``{kind: [rows, example path]}`` of the decoded rows whose image failed."""
    import ray

    errors = pa.concat_tables(
        ray.get(dataset.select_columns([ERROR_COLUMN, _PATH]).to_arrow_refs())
    )
    kinds: dict[str, list] = {}
    for text, path in zip(
        errors.column(ERROR_COLUMN).to_pylist(), errors.column(_PATH).to_pylist()
    ):
        if text is not None:
            _tally(kinds, text.split(":", 1)[0], path)
    return kinds


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Train ``config.model`` on ``config.manifest``'s labels; returns the run summary.

    Args:
        config: the run's options; ``memscore finetune --help`` explains each.

    Returns:
        The run summary, as written to ``finetune.json`` in ``config.output``/``config.name``:
        rows per split, the best epoch and its checkpoint folder, the history, the test
        split's figures, warnings; and ``work_done``, False where the run was already complete
        and this call only read its summary back.

    Raises:
        MemscoreError: one line for each problem the user can fix, before any Ray work (or,
            for images that leave nothing to train on, before any training); a fresh run
            refused so leaves no run folder behind.

    Example: ``memscore.finetune``, which calls this, runs one.
    """
    import ray

    from memscore.sinks.folder import package_versions
    from memscore.training.ray_train import fit, worker_plan

    clock = time.perf_counter()
    config = config.validated()
    start, pipeline, start_kwargs = plan_start(config)
    defaulted = [name for name in _TRAINING_DEFAULTED if getattr(config, name) is None]
    config = config.with_training_defaults(start)
    training_defaults = {
        "start": training_start(start),
        "defaulted": defaulted,
        **{name: getattr(config, name) for name in _TRAINING_DEFAULTED},
    }
    manifest = open_manifest(
        config.manifest,
        path_column=config.path_column,
        storage_options=config.storage_options,
        reserved_columns=(ROW, SPLIT, LABELLED_ROW),
    )
    for option, column in (
        ("--label-column", config.label_column),
        ("--split-column", config.split_column),
    ):
        if column and column not in manifest.columns:
            raise MemscoreError(
                f"{config.manifest}: no {option} {column!r} "
                f"(columns: {', '.join(manifest.columns)})"
            )
    run_dir = storage.join(config.output, config.name)
    identity = _identity(config, manifest, pipeline)
    status = _check_run_dir(config, run_dir, identity)
    if status == "complete":
        finished = _read_json(storage.join(run_dir, SUMMARY_FILE), config.storage_options)
        return {**finished, "work_done": False}

    table, counts, label_problems = _labelled_table(config, manifest)
    split_rows = {s: int(pc.sum(pc.equal(table.column(SPLIT), s)).as_py() or 0) for s in SPLITS}
    all_rows = {s: split_rows[s] + sum(n for n, _ in label_problems[s].values()) for s in SPLITS}
    if split_rows["train"] == 0 or split_rows["validation"] == 0:
        raise _nothing_to_train(
            config, all_rows, split_rows, [label_problems["train"], label_problems["validation"]]
        )

    from memscore.models import get_model_weights

    member = get_model_weights(config.model).verify(pipeline)
    # Decode to the whole 256x256 resize; the 227 crop is cut by the trainer (random or centre).
    preprocess = dataclasses.replace(member.transforms, crop=min(member.transforms.resize))

    from memscore.runtime.cluster_check import check_shared_storage
    from memscore.runtime.ray_start import init_ray

    if status == "fresh":
        start_run_folder(
            run_dir, identity, overwrite=config.overwrite, storage_options=config.storage_options
        )
    try:
        files = _write_splits(table, config, run_dir, with_images=not manifest.images_in_place)
        init_ray(config.address)
        check_shared_storage(run_dir, manifest, config.storage_options)  # >1 node only
        ray.data.DataContext.get_current().max_errored_blocks = 0
        decoded = {
            split: _decoded(config, files[split], manifest, preprocess)
            for split in ("train", "validation")
        }
        errors = {split: _image_errors(data) for split, data in decoded.items()}
        skipped = {
            split: {kind: n for kind, (n, _) in kinds.items()} for split, kinds in errors.items()
        }
        kept = {split: split_rows[split] - sum(skipped[split].values()) for split in skipped}
        if not kept["train"] or not kept["validation"]:
            raise _nothing_to_train(
                config,
                all_rows,
                kept,
                [
                    label_problems["train"],
                    label_problems["validation"],
                    errors["train"],
                    errors["validation"],
                ],
            )
    except MemscoreError:
        if status == "fresh":  # refused before training: the corrected command starts afresh
            abandon_run_folder(run_dir, config.storage_options)
        raise
    usable = {
        split: data.map_batches(_drop_failed, batch_format="pyarrow")
        for split, data in decoded.items()
    }

    gpus_per_worker, threads = worker_plan(
        ray.cluster_resources().get("GPU", 0),
        config.workers,
        config.gpus_per_worker,
        config.torch_threads,
    )
    spec = TrainSpec(
        model=config.model,
        pipeline=pipeline,
        start=start,
        mode=config.mode,
        pixels_column=pixels_column(config.model),
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        optimizer=config.optimizer,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        patience=config.patience,
        augment=config.augmentations,
        seed=config.seed,
        best_dir=storage.join(run_dir, "best"),
        history_file=storage.join(run_dir, "history.json"),
        torch_threads=threads,
        storage_options=dict(config.storage_options),
        start_kwargs=start_kwargs,
        checkpoint_info={
            "training": {
                k: v for k, v in dataclasses.asdict(config).items() if k != "storage_options"
            },
            "manifest_fingerprint": identity["manifest_fingerprint"],
            "started_from": start,
            "versions": package_versions(),
        },
    )
    result = fit(
        _train_worker_entry,
        spec,
        run_dir=run_dir,
        workers=config.workers,
        cpus_per_worker=config.cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        max_failures=config.max_failures,
        datasets=usable,
        # Validation whole on every worker: each scores its share of rows and the
        # predictions are gathered, so every worker sees all of them
        # (streaming_split(equal=True) could drop rows to even the shards).
        datasets_to_split=["train"],
        storage_options=config.storage_options,
    )
    history = _read_json(storage.join(run_dir, "history.json"), config.storage_options) or []
    best_info = (
        _read_json(storage.join(run_dir, "best", "memscore.json"), config.storage_options) or {}
    )
    final = result.metrics or {}

    test = None
    if split_rows["test"] and best_info:
        if manifest.images_in_place:
            files["test_images"] = _write_test_images(config, run_dir, files["test"], manifest)
        test = _score_and_evaluate_test(
            config, run_dir, files, member, image_column=_image_column(manifest)
        )
    warnings = _warnings(config, best_info.get("metrics"), len(history))
    summary = {
        "status": "complete",
        "manifest": config.manifest,
        "run": run_dir,
        "model": config.model,
        "mode": config.mode,
        "pipeline": pipeline,
        "started_from": start,
        "best_checkpoint": storage.join(run_dir, "best"),
        **counts,
        "rows_per_split": split_rows,
        "rows_with_image_errors": {s: sum(k.values()) for s, k in skipped.items()},
        "image_error_kinds": skipped,
        "rows_trained": kept["train"],
        "epochs_requested": config.epochs,
        "epochs_run": len(history),
        "early_stopped": bool(final.get("early_stopped")),
        "starts": final.get("starts", []),
        "resumed_from_epoch": (final.get("starts") or [0])[-1] if status == "resume" else None,
        "best": best_info.get("metrics"),
        "history": history,
        "test": test,
        "warnings": warnings,
        "training_defaults": training_defaults,
        "workers": config.workers,
        "gpus_per_worker": gpus_per_worker,
        "wall_time_s": round(time.perf_counter() - clock, 3),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "versions": package_versions(),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "storage_options"}
        | {"storage_options": storage.redact(config.storage_options)},
    }
    fs, path = storage.url_to_fs(run_dir, config.storage_options)
    storage.pipe_atomic(
        fs,
        f"{path}/{SUMMARY_FILE}",
        (json.dumps(summary, indent=2, default=_json_default) + "\n").encode(),
    )
    return {**summary, "work_done": True}  # not in the file: it says what this call did


def _warnings(config: FinetuneConfig, best: dict | None, epochs_run: int) -> list[str]:
    """What the user should know about a finished run: today, a model that did not learn."""
    rho = (best or {}).get("val_spearman")
    if rho is not None and rho >= LOW_SPEARMAN:
        return []
    settings = (
        f"--optimizer {config.optimizer} --lr {config.lr:g} --batch-size "
        f"{config.batch_size}, {counted(epochs_run, 'epoch')}"
    )
    if rho is None:
        found = (
            "validation Spearman was undefined in every epoch (constant predictions, or "
            "fewer than 3 validation rows)"
        )
    else:
        found = (
            f"the best validation Spearman is {rho:.3f} (epoch {best.get('epoch')}), below "
            f"{LOW_SPEARMAN}"
        )
    return [
        f"{found}: the model has not learnt to rank the validation images ({settings}); "
        f"check the labels, or train longer or with other settings"
    ]


def _train_worker_entry(config: dict) -> None:
    from memscore.finetuning.train_loop import train_worker

    train_worker(config)


def _image_column(manifest: Manifest) -> str | None:
    """The column ``_write_test_images`` writes the images to (the source's image column's
    name); None where the test split names its images by path."""
    return manifest.path_column if manifest.images_in_place else None


def _test_image_rows(table: pa.Table, image: str, image_column: str) -> pa.Table:
    return pa.table(
        {
            LABELLED_ROW: table.column(ROW),
            image_column: pc.cast(table.column(image), pa.binary()),
        }
    )


def _write_test_images(
    config: FinetuneConfig, run_dir: str, test_file: str, manifest: Manifest
) -> str:
    """The test split's images, read in place by the source's Ray tasks and written by Ray
    tasks (never through the driver) to ``splits/test_images/`` as Parquet with the images
    inside (``labelled_row`` and the image's bytes, a null where the row had none), for
    ``memscore score``: the one copy of images the run makes, the test split's."""
    fs, path = storage.url_to_fs(test_file, config.storage_options)
    with fs.open(path, "rb") as f:
        ids = np.sort(pq.read_table(f, columns=[ROW]).column(ROW).to_numpy())
    folder = storage.join(run_dir, "splits", "test_images")
    fs, inner = storage.url_to_fs(folder, config.storage_options)
    if fs.exists(inner):  # a resumed run's earlier copy: written again whole
        fs.rm(inner, recursive=True)
    dataset = manifest.dataset_of_rows(pa.array(ids, pa.int64())).map_batches(
        _test_image_rows,
        fn_kwargs={
            "image": manifest.image_reading()["bytes_column"],
            "image_column": _image_column(manifest),
        },
        batch_format="pyarrow",
    )
    paths, filesystem = storage.for_pyarrow(folder, config.storage_options)
    dataset.write_parquet(paths, filesystem=filesystem)
    return folder


def _score_and_evaluate_test(
    config: FinetuneConfig, run_dir: str, files: dict, member, image_column: str | None = None
) -> dict:
    """Score the test split with the best checkpoint (the scoring job itself) and evaluate it."""
    from memscore.evaluation.config import EvaluateConfig
    from memscore.evaluation.job import evaluate
    from memscore.scoring.config import ScoreConfig
    from memscore.scoring.job import score

    scores = storage.join(run_dir, "test_scores")
    score(
        ScoreConfig(
            files["test_images"],
            output=scores,
            models=(config.model,),
            weights=storage.join(run_dir, "best"),
            path_column=config.path_column,
            image_column=image_column,
            overwrite=True,
            decode_batch_size=config.decode_batch_size,
            io_threads=config.io_threads,
            max_pixels=config.max_pixels,
            fast_decode=config.fast_decode,
            exif_transpose=config.exif_transpose,
            address=config.address,
            storage_options=config.storage_options,
        )
    )
    report = storage.join(run_dir, "test_report")
    metrics = evaluate(
        EvaluateConfig(
            scores,
            truth=files["test_labels"],
            truth_column=config.label_column,
            report=report,
            prediction_column=member.meta["output_column"],
            key=LABELLED_ROW,
            storage_options=config.storage_options,
        )
    )
    return {"scores": scores, "report": report, "metrics": metrics}
