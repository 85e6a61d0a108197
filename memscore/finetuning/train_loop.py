"""What each Ray Train worker runs: epochs of MSE training, validation, checkpoints, early stop.

``train_worker(config)`` is the ``train_loop_per_worker`` of ``memscore finetune``'s
``TorchTrainer``. Its input is the decoded Ray Datasets ``"train"`` (split between workers) and
``"validation"`` (whole on every worker; each worker scores the rows whose ``memscore_row``
falls to its rank and the predictions are gathered, so every worker computes the same Spearman
and takes the same early-stopping decision). Images arrive as the resized 256x256 uint8 arrays
of the shared decode stage; the 227 crop is cut here: random (``augment`` ``crop``) for
training, the centre for validation, which is exactly what ``memscore score`` feeds the model.

Each epoch ends with ``ray.train.report`` through ``memscore.training.ray_train.report_epoch``: rank 0
attaches a checkpoint of everything needed to go on (model, optimiser, epoch, best score,
patience, history), which Ray Train stores under the run's folder and
``memscore.training.ray_train.restore_state`` reads back when the same run is started again. When
validation Spearman improves, rank 0 also writes the model as a memscore checkpoint (``best/``)
with the validation predictions it scored.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "TrainSpec",
    "train_worker",
    "freeze_backbone",
    "crop_batch",
    "build_start_model",
    "LABEL",
    "ROW",
]

from memscore.columns import ROW  # the row's 0-based position in the labelled manifest
from memscore.training.ray_train import gather_across_workers

LABEL = "__memscore_label"  # the label column, as float32, under a name no manifest uses


@dataclass(frozen=True)
class TrainSpec:
    """Everything a worker needs, picklable (the driver builds it from ``FinetuneConfig``)."""

    model: str
    pipeline: str  # the weights member whose preprocessing (and output column) the model uses
    start: str  # "scratch", a weights member name, or a checkpoint path/URL
    mode: str
    pixels_column: str
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    weight_decay: float
    patience: int
    augment: tuple[str, ...]
    seed: int
    best_dir: str
    history_file: str
    torch_threads: int | None = None
    storage_options: dict = field(default_factory=dict)
    checkpoint_info: dict = field(default_factory=dict)  # config, manifest hash ... for best/
    start_kwargs: dict = field(default_factory=dict)  # builder options of the starting model


def build_start_model(spec: TrainSpec):
    """The model training starts from: published weights, a checkpoint, or random init."""
    from memscore.models import get_model, get_model_weights
    from memscore.models.registry import is_checkpoint

    member = get_model_weights(spec.model).verify(spec.pipeline)
    kwargs = dict(spec.start_kwargs)
    if spec.start in ("scratch", "resmem-init"):  # resmem-init: M3M's start_kwargs say how
        if "mode" in member.meta:  # MemNet: the pipeline picks the architecture's input
            kwargs.setdefault("mode", member.meta["mode"])
        return get_model(spec.model, weights=None, **kwargs)
    if is_checkpoint(spec.model, spec.start):
        return get_model(
            spec.model, weights=spec.start, storage_options=spec.storage_options, **kwargs
        )
    return get_model(spec.model, weights=spec.start, **kwargs)


def freeze_backbone(model, backbone: Sequence[str], mode: str) -> list:
    """Freeze what ``mode`` keeps fixed: in head mode the submodules named ``backbone`` (the
    ``backbone`` of the weights' meta); returns the frozen modules (kept in eval mode, so that
    BatchNorm running statistics stay bit-identical too)."""
    if mode == "full":
        return []
    frozen = [getattr(model, attr) for attr in backbone]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def crop_batch(
    arrays: np.ndarray,
    size: int,
    rng: np.random.Generator | None = None,
    *,
    random_crop: bool = False,
    flip: bool = False,
) -> np.ndarray:
    """(N, H, W, 3) -> (N, size, size, 3): centre or random crops, optionally half mirrored.

    The centre offset is torchvision ``center_crop``'s, ``int(round((H - size) / 2))``, so a
    validation crop is the very array ``memscore score`` feeds the model.
    """
    n, h, w, _ = arrays.shape
    if random_crop:
        tops, lefts = rng.integers(0, h - size + 1, n), rng.integers(0, w - size + 1, n)
        out = np.stack([a[t : t + size, x : x + size] for a, t, x in zip(arrays, tops, lefts)])
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        out = arrays[:, top : top + size, left : left + size]
    if flip:
        mirror = rng.random(n) < 0.5
        out = np.where(mirror[:, None, None, None], out[:, :, ::-1], out)
    return out


def _optimizer(spec: TrainSpec, parameters):
    import torch

    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    return torch.optim.AdamW(parameters, lr=spec.lr, weight_decay=spec.weight_decay)


def _predict(model, batches, preprocess, crop: int, device, rank: int, world: int):
    import torch

    rows, preds, labels = [], [], []
    with torch.inference_mode():
        for batch in batches:
            mine = batch[ROW] % world == rank
            if not mine.any():
                continue
            pixels = crop_batch(batch["pixels"][mine], crop)
            x = preprocess.to_tensor(pixels).to(device)
            preds.append(model(x).float().reshape(-1).cpu().numpy())
            rows.append(batch[ROW][mine])
            labels.append(batch["label"][mine])
    empty = np.zeros(0)
    return gather_across_workers(
        {
            ROW: np.concatenate(rows) if rows else empty.astype(np.int64),
            "prediction": np.concatenate(preds) if preds else empty.astype(np.float32),
            "label": np.concatenate(labels) if labels else empty.astype(np.float32),
        }
    )


def _batches(iterator, pixels_column: str, batch_size: int, **kwargs):
    for batch in iterator.iter_batches(batch_size=batch_size, batch_format="numpy", **kwargs):
        yield {
            "pixels": batch[pixels_column],
            "label": batch[LABEL].astype(np.float32),
            ROW: batch[ROW],
        }


def _write_best(spec: TrainSpec, model, metrics: dict, predictions: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memscore.models import get_model_weights
    from memscore.models.checkpoint import save_checkpoint

    member = get_model_weights(spec.model).verify(spec.pipeline)
    table = pa.table(
        {
            ROW: pa.array(predictions[ROW], pa.int64()),
            "label": pa.array(predictions["label"], pa.float32()),
            "prediction": pa.array(predictions["prediction"], pa.float32()),
        }
    )
    table = table.sort_by(ROW)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    info = {
        "model": spec.model,
        "weights": member.name,
        "output_column": member.meta["output_column"],
        "preprocessing": repr(member.transforms),
        "licence": (
            "fine-tuned from " + (member.meta.get("licence") or "")
            if spec.start != "scratch"
            else "trained from scratch by its user"
        ),
        "metrics": metrics,
        **spec.checkpoint_info,
    }
    save_checkpoint(
        spec.best_dir,
        model.state_dict(),
        info,
        spec.storage_options,
        extra_files={"validation_predictions.parquet": buffer.getvalue()},
    )


def _write_history(spec: TrainSpec, history: list[dict]) -> None:
    from memscore import storage

    fs, path = storage.url_to_fs(spec.history_file, spec.storage_options)
    storage.pipe_atomic(fs, path, (json.dumps(history, indent=2) + "\n").encode())


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: ``config["spec"]`` is a ``TrainSpec``."""
    import ray.train
    import torch

    from memscore.evaluation.metrics import spearman
    from memscore.faults import maybe_inject
    from memscore.models import get_model_weights
    from memscore.stages.predict import local_cores
    from memscore.training.ray_train import report_epoch, restore_state

    spec: TrainSpec = config["spec"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(spec.seed + rank)
    if spec.torch_threads or not torch.cuda.is_available():
        torch.set_num_threads(spec.torch_threads or max(1, local_cores() // world))
    member = get_model_weights(spec.model).verify(spec.pipeline)
    preprocess = member.transforms
    crop = preprocess.crop

    model = build_start_model(spec)
    frozen = freeze_backbone(model, member.meta["backbone"], spec.mode)
    state = {
        "epoch": 0,
        "best_spearman": None,
        "best_epoch": None,
        "bad_epochs": 0,
        "history": [],
        "starts": [],
    }
    optimizer_state = restore_state(model, state)

    trainable = [p for p in model.parameters() if p.requires_grad]
    model = ray.train.torch.prepare_model(model)  # device, and DDP when world > 1
    bare = model.module if hasattr(model, "module") else model
    device = next(bare.parameters()).device
    optimizer = _optimizer(spec, trainable)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    train_shard = ray.train.get_dataset_shard("train")
    validation = ray.train.get_dataset_shard("validation")
    loss_fn = torch.nn.MSELoss()
    for epoch in range(state["epoch"], spec.epochs):
        if rank == 0:
            maybe_inject("train-epoch")  # test-only: lets a test kill the run mid-training
        started = time.perf_counter()
        rng = np.random.default_rng([spec.seed, epoch, rank])
        model.train()
        for module in frozen:
            module.eval()
        total, seen = 0.0, 0
        for batch in _batches(
            train_shard,
            spec.pixels_column,
            spec.batch_size,
            local_shuffle_buffer_size=max(4 * spec.batch_size, 256),
            local_shuffle_seed=spec.seed * 1000 + epoch,
        ):
            pixels = crop_batch(
                batch["pixels"],
                crop,
                rng,
                random_crop="crop" in spec.augment,
                flip="flip" in spec.augment,
            )
            x = preprocess.to_tensor(pixels).to(device)
            y = torch.from_numpy(batch["label"]).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x).float().reshape(-1), y)
            loss.backward()
            optimizer.step()
            # .item(): the value alone; float() on a tensor that requires grad warns
            total += loss.item() * len(y)
            seen += len(y)
        train_loss = gather_across_workers({"loss": np.array([total]), "n": np.array([seen])})

        bare.eval()
        predictions = _predict(
            bare,
            _batches(validation, spec.pixels_column, spec.batch_size),
            preprocess,
            crop,
            device,
            rank,
            world,
        )
        pred, label = predictions["prediction"], predictions["label"]
        rho = spearman(pred, label) if len(pred) > 2 else float("nan")
        metrics = {
            "epoch": epoch,
            "train_loss": float(train_loss["loss"].sum() / max(1, train_loss["n"].sum())),
            "train_rows": int(train_loss["n"].sum()),
            "val_spearman": _finite_or_none(rho),
            "val_mse": _finite_or_none(float(np.mean((pred - label) ** 2))) if len(pred) else None,
            "val_rows": int(len(pred)),
            "epoch_time_s": round(time.perf_counter() - started, 3),
        }
        # The first epoch always makes a best/ (even with an undefined Spearman: too few or
        # constant predictions), later ones only by beating it.
        improved = state["best_epoch"] is None or (
            metrics["val_spearman"] is not None
            and (state["best_spearman"] is None or metrics["val_spearman"] > state["best_spearman"])
        )
        if improved:
            # plain floats: the state is reloaded with torch.load(weights_only=True)
            state["best_spearman"], state["best_epoch"] = metrics["val_spearman"], epoch
            state["bad_epochs"] = 0
            if rank == 0:
                _write_best(spec, bare, metrics, predictions)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["history"] = list(state["history"]) + [metrics]
        stop = state["bad_epochs"] >= spec.patience
        report = {
            **metrics,
            "best_val_spearman": _finite_or_none(state["best_spearman"]),
            "best_epoch": state["best_epoch"],
            "early_stopped": stop,
            "starts": state["starts"],
        }
        if rank == 0:
            _write_history(spec, state["history"])
        report_epoch(report, bare, optimizer, state, rank)
        if stop:
            break
