"""``memscore train-sae``: the sparse autoencoder of Takmaz et al. (2025), on Ray Train.

``train_sae(config)`` is what ``memscore train-sae`` and ``jobs/train_sae.py`` call. Everything
it writes goes to ``OUTPUT/NAME/``::

    images.parquet        the manifest's rows trained on: memscore_row and the image path
                          (resolved against the manifest's folder); for images inside
                          Parquet memscore_row alone (``file << 32 | row``: the images are
                          read in place by the source's Ray tasks, never copied)
    representations/      every row's encoder vector (memscore_representation, null with the
                          row's memscore_error where the image failed), as Parquet, and
                          _complete.json, written last: a re-run reads them, not the images
    ray_train/            Ray Train's run: the latest epoch's checkpoint (resume)
    history.json          the losses of every epoch so far
    best/                 the autoencoder after the last epoch, a memscore checkpoint:
                          model.safetensors (fc1.*, fc2.*, mean, std) and memscore.json
                          naming the encoder and its weights; score with
                          `memscore score IMAGES --model ENCODER-sae --weights OUTPUT/NAME/best`
    train_sae.json        the run summary, written last

The representations are computed as images are scored: the shared decode stage with the
encoder folder's own preprocessing, then a pool of encoder actors
(``memscore.train_sae.representations``). Training follows the paper: each representation z-scored per
dimension over the training images, ``(x - mean) / (std + 1e-8)`` (std with Bessel's correction,
as ``torch.std``), ``Linear(d, latents) -> ReLU -> Linear(latents, d)``, loss
``MSE(reduction="sum") + l1 * |fc1 output|.sum()``, AdamW, every image once per epoch in a
shuffled order. There is no validation split: the paper trains on every image and scores them
all, so ``best/`` is the model after the last epoch.

Data-parallel workers (``--workers N``) each hold every representation (N x d float32: 3 MB per
thousand images of a Base-size encoder) and take their part of each step's images from the same
per-epoch permutation; each worker's summed loss is scaled by N, so the gradient DDP averages is
that of the step's images summed, as one worker with N times the batch computes it. Runs with
N workers and batch B, or one worker and batch N x B, take the same steps (to rounding).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memscore import storage
from memscore.columns import ERROR, REPRESENTATION, ROW
from memscore.errors import MemscoreError, counted, first_line
from memscore.train_sae.config import TrainSAEConfig
from memscore.training.run_folder import (
    NOTHING_TO_DO,
    abandon_run_folder,
    check_run_folder,
    json_default as _json_default,
    read_json as _read_json,
    start_run_folder,
)

__all__ = [
    "train_sae",
    "summary_line",
    "SAESpec",
    "train_sae_worker",
    "zscore_statistics",
    "SUMMARY_FILE",
    "sae_model_name",
    "sae_output_column",
]

SUMMARY_FILE = "train_sae.json"
_REPRESENTATIONS = "representations"
_COMPLETE = "_complete.json"
_IMAGES = "images.parquet"
# Rows per representations file: about 30 MB of 768-d float32 vectors each.
_ROWS_PER_FILE = 10_000


def sae_model_name(encoder: str) -> str:
    """The model that scores with an autoencoder trained on ``encoder``: ``clip-sae`` ..."""
    return f"{encoder}-sae"


def sae_output_column(encoder: str) -> str:
    """The column that model writes: ``clip_sae_loss`` ..."""
    return f"{encoder}_sae_loss"


@dataclass(frozen=True)
class SAESpec:
    """What every training worker needs, picklable (built from ``TrainSAEConfig``)."""

    encoder: str
    latents: int
    l1: float
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    seed: int
    best_dir: str
    history_file: str
    encoder_weights: str
    torch_threads: int | None = None
    storage_options: dict = field(default_factory=dict)
    checkpoint_info: dict = field(default_factory=dict)  # memscore.json's record of the run


# --- the driver -------------------------------------------------------------------------------


def train_sae(config: TrainSAEConfig) -> dict[str, Any]:
    """Train the autoencoder on ``config.manifest``'s images; returns the run summary, as
    written to ``train_sae.json``, with ``work_done``: False where the run was already complete
    and this call only read its summary back. A fresh run refused before training (fewer than
    2 images gave a representation) leaves no run folder behind.

    Example:
        >>> from memscore.train_sae.config import TrainSAEConfig
        >>> from memscore.train_sae.job import train_sae
        >>> summary = train_sae(TrainSAEConfig("memcat.csv", output="runs/", encoder="clip",
        ...                                    name="clip-a"))  # doctest: +SKIP
        >>> summary["best_checkpoint"]  # doctest: +SKIP
        'runs/clip-a/best'
    """
    import ray

    from memscore.runtime.cluster_check import check_shared_storage
    from memscore.runtime.ray_start import init_ray
    from memscore.sinks.folder import package_versions
    from memscore.sources.manifest import open_manifest
    from memscore.training.ray_train import fit, worker_plan

    clock = time.perf_counter()
    config = config.validated()
    encoder = _encoder_record(config)
    manifest = open_manifest(
        config.manifest,
        path_column=config.path_column,
        storage_options=config.storage_options,
        reserved_columns=(ROW, REPRESENTATION),
    )
    run_dir = storage.join(config.output, config.name)
    identity = _identity(config, manifest, encoder)
    status = _check_run_dir(config, run_dir, identity)
    if status == "complete":
        finished = _read_json(storage.join(run_dir, SUMMARY_FILE), config.storage_options)
        return {**finished, "work_done": False}

    if status == "fresh":
        start_run_folder(
            run_dir, identity, overwrite=config.overwrite, storage_options=config.storage_options
        )
    try:
        init_ray(config.address)
        check_shared_storage(run_dir, manifest, config.storage_options)  # >1 node only
        ray.data.DataContext.get_current().max_errored_blocks = 0
        gpus = ray.cluster_resources().get("GPU", 0)
        representations, computed = _representations(config, manifest, run_dir, encoder, gpus)
        counts = _count_representations(representations, config, _name_column(manifest))
        if counts["rows_trained"] < 2:
            raise MemscoreError(_nothing_to_train(config, counts))
    except MemscoreError:
        if status == "fresh":  # refused before training: the corrected command starts afresh
            abandon_run_folder(run_dir, config.storage_options)
        raise

    gpus_per_worker, threads = worker_plan(
        gpus, config.workers, config.gpus_per_worker, config.torch_threads
    )
    spec = SAESpec(
        encoder=config.encoder,
        latents=config.latents,
        l1=config.l1,
        lr=config.lr,
        weight_decay=config.weight_decay,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        best_dir=storage.join(run_dir, "best"),
        history_file=storage.join(run_dir, "history.json"),
        torch_threads=threads,
        storage_options=dict(config.storage_options),
        encoder_weights=encoder["weights"],
        checkpoint_info={
            "encoder_sha256": encoder["sha256"],
            "representation": encoder["representation"],
            "normalisation": "(x - mean) / (std + 1e-8), mean and std (Bessel-corrected) per "
            "dimension over the training images",
            "licence": "trained by its user on their images; the encoder's own licence applies "
            "to the encoder",
            "rows_trained": counts["rows_trained"],
            "manifest_fingerprint": identity["manifest_fingerprint"],
            "training": _config_record(config),
            "versions": package_versions(),
        },
    )
    paths, filesystem = storage.for_pyarrow(representations, config.storage_options)
    data = ray.data.read_parquet(paths, filesystem=filesystem).select_columns([ROW, REPRESENTATION])
    result = fit(
        _train_worker_entry,
        spec,
        run_dir=run_dir,
        workers=config.workers,
        cpus_per_worker=config.cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        max_failures=config.max_failures,
        datasets={"representations": data},
        # Every worker reads every vector: each takes its part of each step from the
        # same permutation (see the module docstring), which a streaming split cannot
        # give.
        datasets_to_split=[],
        storage_options=config.storage_options,
    )
    final = result.metrics or {}
    history = _read_json(storage.join(run_dir, "history.json"), config.storage_options) or []
    summary = {
        "status": "complete",
        "manifest": config.manifest,
        "run": run_dir,
        "model": sae_model_name(config.encoder),
        "output_column": sae_output_column(config.encoder),
        "encoder": encoder,
        "best_checkpoint": storage.join(run_dir, "best"),
        "representations": representations,
        "representations_computed_now": computed,
        **counts,
        "epochs_requested": config.epochs,
        "epochs_run": len(history),
        "initial_reconstruction_loss": final.get("initial_reconstruction_loss"),
        "final_reconstruction_loss": history[-1]["reconstruction_loss"] if history else None,
        "history": history,
        "starts": final.get("starts", []),
        "resumed_from_epoch": (final.get("starts") or [0])[-1] if status == "resume" else None,
        "workers": config.workers,
        "gpus_per_worker": gpus_per_worker,
        "wall_time_s": round(time.perf_counter() - clock, 3),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "versions": package_versions(),
        "config": _config_record(config)
        | {"storage_options": storage.redact(config.storage_options)},
    }
    fs, path = storage.url_to_fs(run_dir, config.storage_options)
    storage.pipe_atomic(
        fs,
        f"{path}/{SUMMARY_FILE}",
        (json.dumps(summary, indent=2, default=_json_default) + "\n").encode(),
    )
    return {**summary, "work_done": True}  # not in the file: it says what this call did


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the terminal: rows trained, the loss before and after, the checkpoint;
    first, for a run that was already complete (``work_done`` False), that nothing was done."""

    def fmt(value):
        return "-" if value is None else f"{value:.4g}"

    done = f"{NOTHING_TO_DO}: " if summary.get("work_done") is False else ""
    return (
        f"memscore: {done}autoencoder on {summary['encoder']['name']} representations of "
        f"{counted(summary['rows_trained'], 'image')} "
        f"({summary['rows_with_image_errors']} failed), "
        f"{counted(summary['epochs_run'], 'epoch')}: mean reconstruction loss "
        f"{fmt(summary['initial_reconstruction_loss'])} -> "
        f"{fmt(summary['final_reconstruction_loss'])} -> {summary['best_checkpoint']}"
    )


def _encoder_record(config: TrainSAEConfig) -> dict[str, Any]:
    """The encoder's folder found and checked before any cluster work, and what names it."""
    from memscore.models import WeightsNotFoundError, encoders

    try:
        folder = encoders.locate_folder(config.encoder, config.weights)
        encoders.check_folder(config.encoder, folder, config.storage_options)
        preprocess = encoders.preprocess_of(config.encoder, folder, config.storage_options)
        digest = encoders.folder_digest(folder, config.storage_options)
    except (WeightsNotFoundError, ValueError, FileNotFoundError) as exc:
        raise MemscoreError(first_line(exc)) from None
    representation = (
        "pooled image features (the attention-pooling head's output)"
        if config.encoder == "siglip2"
        else "the last hidden state's token 0 (CLS), before the post-layernorm"
    )
    return {
        "name": config.encoder,
        "weights": config.weights or encoders.ENCODERS[config.encoder],
        "folder": folder,
        "sha256": digest,
        "preprocess": preprocess,
        "representation": representation,
    }


def _config_record(config: TrainSAEConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "storage_options"}


def _identity(config: TrainSAEConfig, manifest, encoder: dict) -> dict[str, Any]:
    """What makes a run this run; a re-run with another identity must not resume it. Epochs
    may change, so a finished run can be trained further under the same name."""
    from memscore.sources.manifest import manifest_fingerprint

    keep = (
        "manifest",
        "encoder",
        "path_column",
        "latents",
        "l1",
        "lr",
        "weight_decay",
        "batch_size",
        "seed",
        "workers",
        "fast_decode",
        "exif_transpose",
    )
    identity = {key: getattr(config, key) for key in keep}
    identity.update(
        manifest_fingerprint=manifest_fingerprint(manifest),
        encoder_weights=encoder["weights"],
        encoder_sha256=encoder["sha256"],
    )
    return identity


def _check_run_dir(config: TrainSAEConfig, run_dir: str, identity: dict) -> str:
    """'fresh', 'resume' or 'complete' (nothing written); refuses to mix two different runs in
    one folder."""
    return check_run_folder(
        run_dir,
        identity,
        job="train-sae",
        summary_file=SUMMARY_FILE,
        is_complete=lambda summary: summary.get("epochs_run", 0) >= config.epochs,
        overwrite=config.overwrite,
        storage_options=config.storage_options,
    )


def _name_column(manifest) -> str:
    """The column that names a row in messages: its image path, or for images inside Parquet
    (no path) its ``memscore_row``."""
    return ROW if manifest.images_in_place else manifest.path_column


def _images_table(config: TrainSAEConfig, manifest) -> pa.Table:
    """memscore_row and the resolved path of every manifest row; memscore_row alone where the
    images are read in place (the driver reads no column of the rows: their ids are the
    files' footers')."""
    from memscore.row_errors import ImageDecodeError
    from memscore.stages.fetch import resolve_path

    def resolved(value):
        try:
            return resolve_path(value, manifest.base_dir)
        except ImageDecodeError:
            return value  # the decode stage reports it as the row's error

    if manifest.images_in_place:
        rows = sum(t.num_rows for t in manifest.read_all(columns=()))
        return pa.table({ROW: manifest.row_ids(rows)})
    tables = manifest.read_all()
    paths = [p for t in tables for p in t.column(manifest.path_column).to_pylist()]
    return pa.table(
        {
            ROW: pa.array(np.arange(len(paths)), pa.int64()),
            manifest.path_column: pa.array([resolved(p) for p in paths], pa.string()),
        }
    )


def _representations(
    config: TrainSAEConfig, manifest, run_dir: str, encoder: dict, gpus: float
) -> tuple[str, bool]:
    """The folder of every row's representation, computed now unless a complete one is there;
    -> (folder, whether it was computed now)."""
    import ray

    from memscore.sinks import open_sink
    from memscore.train_sae.representations import representation_dataset

    folder = storage.join(run_dir, _REPRESENTATIONS)
    fs, path = storage.url_to_fs(folder, config.storage_options)
    if fs.exists(f"{path}/{_COMPLETE}"):
        return folder, False
    if fs.exists(path):  # an interrupted write: its files are this run's own
        fs.rm(path, recursive=True)
    images = storage.join(run_dir, _IMAGES)
    table = _images_table(config, manifest)
    run_fs, run_path = storage.url_to_fs(run_dir, config.storage_options)
    with run_fs.open(f"{run_path}/{_IMAGES}", "wb") as f:
        pq.write_table(table, f)
    if manifest.images_in_place:  # every row, read where it lies by the source's tasks
        dataset = manifest.dataset_of_rows(table.column(ROW).combine_chunks())
    else:
        paths, filesystem = storage.for_pyarrow(images, config.storage_options)
        dataset = ray.data.read_parquet(paths, filesystem=filesystem)
    dataset = dataset.repartition(target_num_rows_per_block=config.rows_per_block)
    use_gpu = gpus > 0
    actors = config.actors or (max(1, int(gpus)) if use_gpu else 1)
    dataset = representation_dataset(
        dataset,
        config,
        manifest,
        config.encoder,
        config.weights,
        encoder["preprocess"],
        use_gpu=use_gpu,
        actors=actors,
        batch_size=config.encode_batch_size,
        torch_threads=config.torch_threads,
    )
    dataset = dataset.select_columns(
        list(dict.fromkeys([ROW, _name_column(manifest), ERROR, REPRESENTATION]))
    )
    open_sink(folder, config.storage_options).write(dataset, _ROWS_PER_FILE)
    storage.pipe_atomic(
        fs,
        f"{path}/{_COMPLETE}",
        (
            json.dumps(
                {
                    "rows": table.num_rows,
                    "encoder": encoder["name"],
                    "encoder_weights": encoder["weights"],
                    "encoder_sha256": encoder["sha256"],
                }
            )
            + "\n"
        ).encode(),
    )
    return folder, True


def _count_representations(folder: str, config: TrainSAEConfig, path_column: str) -> dict[str, Any]:
    """Rows in, rows with a vector, the failed ones by kind (with an example path), and d."""
    from memscore.sinks import open_sink

    fs, _ = storage.url_to_fs(folder, config.storage_options)
    rows = errors = 0
    kinds: dict[str, list] = {}
    dims: set[int] = set()
    for file in open_sink(folder, config.storage_options).files():
        with fs.open(file, "rb") as f:
            table = pq.read_table(f, columns=[ERROR, path_column, REPRESENTATION])
        rows += table.num_rows
        failed = pc.is_valid(table.column(ERROR))
        for text, path in zip(
            table.column(ERROR).filter(failed).to_pylist(),
            table.column(path_column).filter(failed).to_pylist(),
        ):
            entry = kinds.setdefault(text.split(":", 1)[0], [0, path])
            entry[0] += 1
            errors += 1
        lengths = pc.list_value_length(table.column(REPRESENTATION)).drop_null()
        dims.update(int(v) for v in pc.unique(lengths).to_pylist())
    return {
        "rows_in": rows,
        "rows_with_image_errors": errors,
        "image_error_kinds": {k: v[0] for k, v in kinds.items()},
        "image_error_examples": {k: v[1] for k, v in kinds.items()},
        "rows_trained": rows - errors,
        "representation_dim": max(dims) if dims else None,
    }


def _nothing_to_train(config: TrainSAEConfig, counts: dict) -> str:
    text = (
        f"{config.manifest}: {counts['rows_trained']} of "
        f"{counted(counts['rows_in'], 'image')} gave a representation; the autoencoder "
        f"needs at least 2"
    )
    if counts["image_error_kinds"]:
        kind, n = max(counts["image_error_kinds"].items(), key=lambda item: item[1])
        text += (
            f"; commonest problem: {kind} ({counted(n, 'row')}), e.g. "
            f"{counts['image_error_examples'][kind]}"
        )
    return text


def _train_worker_entry(config: dict) -> None:
    train_sae_worker(config)


# --- each Ray Train worker --------------------------------------------------------------------


def _load_vectors(shard) -> np.ndarray:
    """Every row's vector, in memscore_row order, without the rows that have none."""
    rows, vectors = [], []
    for batch in shard.iter_batches(batch_format="pyarrow", batch_size=4096):
        column = batch.column(REPRESENTATION)
        keep = pc.is_valid(column)
        batch = batch.filter(keep)
        if not batch.num_rows:
            continue
        column = batch.column(REPRESENTATION).combine_chunks()
        dim = len(column[0])
        rows.append(batch.column(ROW).to_numpy())
        vectors.append(
            pc.list_flatten(column)
            .to_numpy(zero_copy_only=False)
            .astype(np.float32)
            .reshape(-1, dim)
        )
    if not rows:
        raise ValueError("no representations to train on")
    order = np.argsort(np.concatenate(rows), kind="stable")
    return np.concatenate(vectors)[order]


def zscore_statistics(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation (Bessel-corrected, as ``torch.std``) of the
    training images' representations, computed in float64 and returned as float32."""
    data = np.asarray(vectors, dtype=np.float64)
    return data.mean(0).astype(np.float32), data.std(0, ddof=1).astype(np.float32)


def _mean_reconstruction(sae, z, chunk: int = 4096) -> float:
    """The mean over images of the reconstruction term, summed over d."""
    import torch

    total = 0.0
    with torch.inference_mode():
        for start in range(0, z.shape[0], chunk):
            decoded, _ = sae(z[start : start + chunk])
            total += float((decoded - z[start : start + chunk]).pow(2).sum())
    return total / z.shape[0]


def train_sae_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: ``config["spec"]`` is a ``SAESpec``."""
    import ray.train
    import torch

    from memscore.faults import maybe_inject
    from memscore.models.sae import SparseAutoencoder, save_sae_checkpoint, training_loss
    from memscore.stages.predict import local_cores
    from memscore.training.ray_train import gather_across_workers, report_epoch, restore_state

    spec: SAESpec = config["spec"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if spec.torch_threads or not torch.cuda.is_available():
        torch.set_num_threads(spec.torch_threads or max(1, local_cores() // world))

    vectors = _load_vectors(ray.train.get_dataset_shard("representations"))
    mean, std = zscore_statistics(vectors)
    torch.manual_seed(spec.seed)  # the same start on every worker (DDP broadcasts rank 0's)
    sae = SparseAutoencoder(vectors.shape[1], spec.latents)
    with torch.no_grad():
        sae.mean.copy_(torch.from_numpy(mean))
        sae.std.copy_(torch.from_numpy(std))
    state: dict[str, Any] = {
        "epoch": 0,
        "history": [],
        "starts": [],
        "initial_reconstruction_loss": None,
    }
    optimizer_state = restore_state(sae, state)

    model = ray.train.torch.prepare_model(sae)  # device, and DDP when world > 1
    bare = model.module if hasattr(model, "module") else model
    device = next(bare.parameters()).device
    z = bare.normalise(torch.from_numpy(vectors).to(device))
    optimizer = torch.optim.AdamW(bare.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    if state["initial_reconstruction_loss"] is None:
        state["initial_reconstruction_loss"] = _mean_reconstruction(bare, z)

    n = z.shape[0]
    step_rows = spec.batch_size * world
    if state["epoch"] >= spec.epochs:  # trained before the run was stopped: report it again
        ray.train.report(
            {
                **state["history"][-1],
                "starts": state["starts"],
                "initial_reconstruction_loss": state["initial_reconstruction_loss"],
            }
        )
        return
    for epoch in range(state["epoch"], spec.epochs):
        if rank == 0:
            maybe_inject("train-epoch")  # test-only: lets a test kill the run mid-training
        started = time.perf_counter()
        # One permutation per epoch, the same on every worker and for any number of workers.
        order = torch.from_numpy(np.random.default_rng([spec.seed, epoch]).permutation(n))
        model.train()
        total = reconstruction = 0.0
        for start in range(0, n, step_rows):
            mine = order[start : start + step_rows][
                rank * spec.batch_size : (rank + 1) * spec.batch_size
            ]
            batch = z[mine.to(device)]  # may be empty on the last step: a zero gradient
            loss, recon = training_loss(model, batch, spec.l1)
            optimizer.zero_grad(set_to_none=True)
            (loss * world).backward()  # DDP averages: the step's summed gradient
            optimizer.step()
            total += float(loss.detach())
            reconstruction += float(recon.detach())
        sums = gather_across_workers(
            {"loss": np.array([total]), "reconstruction": np.array([reconstruction])}
        )
        bare.eval()
        metrics = {
            "epoch": epoch,
            "train_loss": float(sums["loss"].sum() / n),
            "train_reconstruction_loss": float(sums["reconstruction"].sum() / n),
            "reconstruction_loss": _mean_reconstruction(bare, z),
            "rows": int(n),
            "epoch_time_s": round(time.perf_counter() - started, 3),
        }
        state["epoch"] = epoch + 1
        state["history"] = list(state["history"]) + [metrics]
        last = state["epoch"] >= spec.epochs
        if rank == 0:
            _write_history(spec, state["history"])
            if last:
                save_sae_checkpoint(
                    spec.best_dir,
                    bare,
                    encoder=spec.encoder,
                    encoder_weights=spec.encoder_weights,
                    info={**spec.checkpoint_info, "metrics": metrics, "epochs": state["epoch"]},
                    storage_options=spec.storage_options,
                )
        report = {
            **metrics,
            "starts": state["starts"],
            "initial_reconstruction_loss": state["initial_reconstruction_loss"],
        }
        report_epoch(report, bare, optimizer, state, rank)


def _write_history(spec: SAESpec, history: list[dict]) -> None:
    fs, path = storage.url_to_fs(spec.history_file, spec.storage_options)
    storage.pipe_atomic(fs, path, (json.dumps(history, indent=2) + "\n").encode())
