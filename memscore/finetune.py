"""Fine-tuning: labelled manifest -> splits -> the scoring job's decode stage -> Ray Train.

``finetune(config)`` is what ``memscore finetune`` and ``jobs/finetune.py`` call. Everything it
writes goes to ``OUTPUT/NAME/``::

    splits/{train,validation,test}.parquet   the manifest's rows (every column, image paths
                                             resolved) with memscore_row and memscore_split
    splits/{validation,test}_images.parquet  the same without the label column, to score
    ray_train/                               Ray Train's run: per-epoch checkpoints (resume)
    best/                                    the best epoch's memscore checkpoint, scoreable
                                             with `memscore score --weights OUTPUT/NAME/best`
    history.json                             metrics of every epoch so far
    test_scores/, test_report/               the best model scored on the test split by
                                             `memscore score`, and `memscore evaluate`'s report
    finetune.json                            the run summary, written last

Images go through the same manifest reader and the same decode stage (``run.decode_batch``)
as scoring, once: the decoded 256x256 arrays are materialised in Ray's object store and every
epoch reads them from there. The driver only plans, counts and reports; the decoding runs as
Ray tasks and the training on Ray Train workers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memscore import storage
from memscore.config import FinetuneConfig, MemscoreError, first_line
from memscore.decode import ERROR_COLUMN, ImageDecodeError, pixels_column, resolve_path
from memscore.manifest import Manifest, open_manifest
from memscore.splits import (
    SPLITS,
    assign_splits,
    normalise_split_column,
    parse_fractions,
)
from memscore.train_loop import LABEL, ROW, TrainSpec

__all__ = ["finetune", "ROW", "SPLIT", "plan_start"]

SPLIT = "memscore_split"
SUMMARY_FILE = "finetune.json"
_STATE_FILE = "state.json"


def plan_start(config: FinetuneConfig) -> tuple[str, str, dict]:
    """(start, pipeline, builder kwargs): the starting weights, and the weights member whose
    preprocessing the training uses (a checkpoint's own, else the model's DEFAULT if it is a
    single-crop pipeline, else its first single-crop member: MemNet trains its modern one)."""
    from memscore.checkpoint import read_checkpoint_info
    from memscore.models import WeightsNotFoundError, get_model_weights
    from memscore.models._api import is_checkpoint_path
    from memscore.transforms import ImagePreprocess

    enum_cls = get_model_weights(config.model)
    start, member = config.weights, None
    try:
        if start is not None and is_checkpoint_path(start):
            info = read_checkpoint_info(start, config.storage_options)
            if info is not None:
                if info["model"] != config.model:
                    raise MemscoreError(f"--weights {start} is a checkpoint of {info['model']!r}, "
                                        f"not {config.model!r}")
                member = enum_cls.verify(info["weights"])
        elif start not in (None, "scratch"):
            member = enum_cls.verify(start)
    except (ValueError, FileNotFoundError) as exc:
        raise MemscoreError(f"--weights: {exc}") from None
    if member is None:
        candidates = [enum_cls.DEFAULT] + [m for m in enum_cls if m is not enum_cls.DEFAULT]
        member = next((m for m in candidates if isinstance(m.transforms, ImagePreprocess)), None)
    if member is None or not isinstance(member.transforms, ImagePreprocess):
        raise MemscoreError(f"{config.model}: the weights {getattr(member, 'name', None)} use a "
                            f"pipeline memscore cannot train (single centre-crop ones only)")
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
    from memscore.resume import manifest_fingerprint

    keep = ("manifest", "label_column", "model", "mode", "weights", "path_column",
            "split_column", "split_fractions", "split_seed", "batch_size", "optimizer", "lr",
            "momentum", "weight_decay", "augment", "seed", "workers")
    identity = {key: getattr(config, key) for key in keep}
    identity.update(manifest_fingerprint=manifest_fingerprint(manifest), pipeline=pipeline)
    return identity


def _prepare_run_dir(config: FinetuneConfig, run_dir: str, identity: dict) -> str:
    """'fresh', 'resume' or 'complete'; refuses to mix two different runs in one folder."""
    fs, path = storage.url_to_fs(run_dir, config.storage_options)
    if config.overwrite and fs.exists(path):
        fs.rm(path, recursive=True)
    state_path = f"{path}/{_STATE_FILE}"
    if fs.exists(state_path):
        saved = json.loads(fs.cat_file(state_path))
        changed = [k for k in identity if saved.get(k) != identity[k]]
        if changed:
            raise MemscoreError(
                f"{run_dir} holds a run with other settings ({', '.join(changed)} differ); "
                f"choose another --name or pass --overwrite")
        if fs.exists(f"{path}/{SUMMARY_FILE}"):
            summary = json.loads(fs.cat_file(f"{path}/{SUMMARY_FILE}"))
            if summary.get("epochs_requested", 0) >= config.epochs or summary.get("early_stopped"):
                return "complete"
        return "resume"
    if fs.exists(path) and fs.ls(path):
        raise MemscoreError(f"{run_dir} exists and is not a memscore finetune run; choose another "
                            f"--name or pass --overwrite")
    if not storage.is_url(run_dir):
        fs.makedirs(path, exist_ok=True)
    fs.pipe_file(state_path, (json.dumps(identity, indent=2) + "\n").encode())
    return "fresh"


def _labelled_table(config: FinetuneConfig, manifest: Manifest) -> tuple[pa.Table, dict]:
    """The manifest with its row ids, resolved paths, float labels and splits; and the counts
    of rows left out for want of a label."""
    table = pa.concat_tables(list(manifest.iter_tables()), promote_options="permissive")
    try:
        labels = pc.cast(table.column(config.label_column), pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise MemscoreError(f"{config.manifest}: --label-column {config.label_column!r} is "
                            f"{table.schema.field(config.label_column).type}, not numbers") from None
    table = table.append_column(ROW, pa.array(np.arange(table.num_rows), pa.int64()))
    paths = table.column(manifest.path_column).to_pylist()
    table = table.set_column(table.column_names.index(manifest.path_column), manifest.path_column,
                             pa.array([_resolved(p, manifest.base_dir) for p in paths], pa.string()))
    if config.split_column:
        try:
            splits = normalise_split_column(table.column(config.split_column), config.split_column)
        except ValueError as exc:
            raise MemscoreError(f"{config.manifest}: {exc}") from None
    else:
        # the hash is of the path as the manifest gives it, so moving the images does not
        # move rows between splits
        splits = assign_splits(pa.array(paths, pa.string()),
                               parse_fractions(config.split_fractions), config.split_seed)
    table = table.append_column(SPLIT, splits)
    values = labels.to_numpy(zero_copy_only=False)
    usable = np.isfinite(np.where(pc.is_null(labels).to_numpy(zero_copy_only=False), np.nan,
                                  values.astype(float)))
    counts = {"rows_in": table.num_rows, "rows_without_label": int((~usable).sum())}
    return table.filter(pa.array(usable)), counts


def _resolved(path: Any, base_dir: str | None) -> Any:
    try:
        return resolve_path(path, base_dir)
    except ImageDecodeError:
        return path  # the decode stage reports it as the row's error


def _write_splits(table: pa.Table, config: FinetuneConfig, run_dir: str) -> dict[str, str]:
    fs, path = storage.url_to_fs(run_dir, config.storage_options)
    if not storage.is_url(run_dir):
        fs.makedirs(f"{path}/splits", exist_ok=True)
    files = {}
    for split in SPLITS:
        part = table.filter(pc.equal(table.column(SPLIT), split))
        for name, data in ((split, part),
                           (f"{split}_images", part.drop_columns([config.label_column]))):
            if name == "train_images":
                continue
            with fs.open(f"{path}/splits/{name}.parquet", "wb") as f:
                pq.write_table(data, f)
            files[name] = storage.join(run_dir, "splits", f"{name}.parquet")
    return files


def _keep_for_training(table: pa.Table, label_column: str, pixels: str) -> pa.Table:
    return pa.table({ROW: table.column(ROW),
                     LABEL: pc.cast(table.column(label_column), pa.float32()),
                     pixels: table.column(pixels),
                     ERROR_COLUMN: table.column(ERROR_COLUMN)})


def _drop_failed(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table.column(ERROR_COLUMN)))


def _decoded(config: FinetuneConfig, split_file: str, manifest: Manifest, preprocess):
    """A split's rows decoded once by the scoring job's decode stage, held in the object store."""
    import ray.data

    from memscore.run import decode_stage

    paths, filesystem = storage.for_pyarrow(split_file, config.storage_options)
    dataset = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(
        [manifest.path_column, ROW, config.label_column]).repartition(
        target_num_rows_per_block=config.rows_per_block)
    # the split files hold resolved paths: no base folder
    dataset = decode_stage(dataset, config, manifest, {config.model: preprocess}, None)
    dataset = dataset.map_batches(
        _keep_for_training, fn_kwargs={"label_column": config.label_column,
                                       "pixels": pixels_column(config.model)},
        batch_format="pyarrow")
    return dataset.materialize()


def _error_counts(dataset) -> dict[str, int]:
    import ray

    errors = pa.concat_tables(ray.get(dataset.select_columns([ERROR_COLUMN]).to_arrow_refs()))
    kinds: dict[str, int] = {}
    for text in errors.column(ERROR_COLUMN).to_pylist():
        if text is not None:
            kind = text.split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Train ``config.model`` on ``config.manifest``'s labels; returns the run summary.

    Example:
        >>> from memscore import FinetuneConfig
        >>> from memscore.finetune import finetune
        >>> summary = finetune(FinetuneConfig(
        ...     "labelled.csv", output="runs/", name="lab-a", model="memnet", epochs=5))
        >>> summary["best"]["val_spearman"] > 0
        True
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from memscore.output import package_versions
    from memscore.predict import local_cores

    clock = time.perf_counter()
    config = config.validated()
    start, pipeline, start_kwargs = plan_start(config)
    manifest = open_manifest(config.manifest, path_column=config.path_column,
                             storage_options=config.storage_options,
                             reserved_columns=(ROW, SPLIT))
    for option, column in (("--label-column", config.label_column),
                           ("--split-column", config.split_column)):
        if column and column not in manifest.columns:
            raise MemscoreError(f"{config.manifest}: no {option} {column!r} "
                                f"(columns: {', '.join(manifest.columns)})")
    run_dir = storage.join(config.output, config.name)
    identity = _identity(config, manifest, pipeline)
    status = _prepare_run_dir(config, run_dir, identity)
    if status == "complete":
        fs, path = storage.url_to_fs(run_dir, config.storage_options)
        return json.loads(fs.cat_file(f"{path}/{SUMMARY_FILE}"))

    table, counts = _labelled_table(config, manifest)
    files = _write_splits(table, config, run_dir)
    split_rows = {s: int(pc.sum(pc.equal(table.column(SPLIT), s)).as_py() or 0) for s in SPLITS}
    if split_rows["train"] == 0 or split_rows["validation"] == 0:
        raise MemscoreError(f"{config.manifest}: the train split has {split_rows['train']} and the "
                            f"validation split {split_rows['validation']} labelled rows; both "
                            f"need some")

    from memscore.models import get_model_weights

    member = get_model_weights(config.model).verify(pipeline)
    # Decode to the whole 256x256 resize; the 227 crop is cut by the trainer (random or centre).
    preprocess = dataclasses.replace(member.transforms, crop=min(member.transforms.resize))

    from memscore.cluster_check import check_shared_storage
    from memscore.run import init_ray

    init_ray(config.address)
    check_shared_storage(run_dir, manifest, config.storage_options)  # >1 node only
    ray.data.DataContext.get_current().max_errored_blocks = 0
    decoded = {split: _decoded(config, files[split], manifest, preprocess)
               for split in ("train", "validation")}
    skipped = {split: _error_counts(data) for split, data in decoded.items()}
    usable = {split: data.map_batches(_drop_failed, batch_format="pyarrow")
              for split, data in decoded.items()}

    gpus = ray.cluster_resources().get("GPU", 0)
    gpus_per_worker = (1.0 if gpus else 0.0) if config.gpus_per_worker is None \
        else config.gpus_per_worker
    threads = config.torch_threads or (None if gpus_per_worker else
                                       max(1, local_cores() // config.workers))
    train_path, train_fs = storage.for_pyarrow(run_dir, config.storage_options)
    if not storage.is_url(run_dir):
        train_path = os.path.abspath(train_path)
    spec = TrainSpec(
        model=config.model, pipeline=pipeline, start=start, mode=config.mode,
        pixels_column=pixels_column(config.model), epochs=config.epochs,
        batch_size=config.batch_size, lr=config.lr, optimizer=config.optimizer,
        momentum=config.momentum, weight_decay=config.weight_decay, patience=config.patience,
        augment=config.augmentations, seed=config.seed,
        best_dir=storage.join(run_dir, "best"), history_file=storage.join(run_dir, "history.json"),
        torch_threads=threads, storage_options=dict(config.storage_options),
        start_kwargs=start_kwargs,
        checkpoint_info={"training": {k: v for k, v in dataclasses.asdict(config).items()
                                      if k != "storage_options"},
                         "manifest_fingerprint": identity["manifest_fingerprint"],
                         "started_from": start, "versions": package_versions()},
    )
    trainer = TorchTrainer(
        train_loop_per_worker=_train_worker_entry,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker={"CPU": config.cpus_per_worker,
                                                           **({"GPU": gpus_per_worker}
                                                              if gpus_per_worker else {})}),
        run_config=RunConfig(
            name="ray_train", storage_path=train_path, storage_filesystem=train_fs,
            # The latest epoch only: it is what a resumed run needs; the best model is kept
            # apart in best/ (written by the trainer when validation improves).
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
        datasets=usable,
        # Validation whole on every worker: each scores its share of rows and the predictions
        # are gathered, so every worker sees all of them (streaming_split(equal=True) could
        # drop rows to even the shards).
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps the worker's error; keep its first line
        raise MemscoreError(f"training failed: {first_line(exc)}") from exc
    history = _read_json(storage.join(run_dir, "history.json"), config.storage_options) or []
    best_info = _read_json(storage.join(run_dir, "best", "memscore.json"),
                           config.storage_options) or {}
    final = result.metrics or {}

    test = None
    if split_rows["test"] and best_info:
        test = _score_and_evaluate_test(config, run_dir, files, member)
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
        "rows_trained": split_rows["train"] - sum(skipped["train"].values()),
        "epochs_requested": config.epochs,
        "epochs_run": len(history),
        "early_stopped": bool(final.get("early_stopped")),
        "starts": final.get("starts", []),
        "resumed_from_epoch": (final.get("starts") or [0])[-1] if status == "resume" else None,
        "best": best_info.get("metrics"),
        "history": history,
        "test": test,
        "workers": config.workers,
        "gpus_per_worker": gpus_per_worker,
        "wall_time_s": round(time.perf_counter() - clock, 3),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "versions": package_versions(),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "storage_options"}
        | {"storage_options": storage.redact(config.storage_options)},
    }
    fs, path = storage.url_to_fs(run_dir, config.storage_options)
    fs.pipe_file(f"{path}/{SUMMARY_FILE}",
                 (json.dumps(summary, indent=2, default=_json_default) + "\n").encode())
    return summary


def _train_worker_entry(config: dict) -> None:
    from memscore.train_loop import train_worker

    train_worker(config)


def _json_default(value: Any):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _read_json(path: str, storage_options) -> Any:
    fs, inner = storage.url_to_fs(path, storage_options)
    return json.loads(fs.cat_file(inner)) if fs.exists(inner) else None


def _score_and_evaluate_test(config: FinetuneConfig, run_dir: str, files: dict, member) -> dict:
    """Score the test split with the best checkpoint (the scoring job itself) and evaluate it."""
    from memscore.config import EvaluateConfig, ScoreConfig
    from memscore.evaluate import evaluate
    from memscore.run import score

    scores = storage.join(run_dir, "test_scores")
    score(ScoreConfig(files["test_images"], output=scores, models=(config.model,),
                      weights=storage.join(run_dir, "best"), path_column=config.path_column,
                      overwrite=True, decode_batch_size=config.decode_batch_size,
                      io_threads=config.io_threads, max_pixels=config.max_pixels,
                      fast_decode=config.fast_decode, exif_transpose=config.exif_transpose,
                      address=config.address,
                      storage_options=config.storage_options))
    report = storage.join(run_dir, "test_report")
    metrics = evaluate(EvaluateConfig(
        scores, truth=files["test"], truth_column=config.label_column, report=report,
        prediction_column=member.meta["output_column"], key=ROW,
        storage_options=config.storage_options))
    return {"scores": scores, "report": report, "metrics": metrics}
