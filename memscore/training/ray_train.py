"""The Ray Train plumbing that ``memscore finetune`` and ``memscore train-sae`` share.

Both jobs train one torch module data-parallel with Ray Train, keep the latest epoch as Ray
Train's checkpoint (what a restarted worker group or a resumed run continues from) and write
their own results (``best/``, ``history.json``) beside it in the run folder
(``memscore.training.run_folder``). What they train, and how, is theirs (``train_loop``, ``train_sae``).

Driver side: ``worker_plan`` (GPUs and torch threads per worker) and ``fit`` (the
``TorchTrainer``, its failure policy, one error line when training fails).
Worker side: ``restore_state`` and ``report_epoch``, the per-epoch checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from memscore import storage
from memscore.errors import MemscoreError, first_line

__all__ = [
    "STATE_FILE",
    "worker_plan",
    "fit",
    "restore_state",
    "report_epoch",
    "gather_across_workers",
]

#: The training state in each of Ray Train's checkpoints: the module's and the optimizer's
#: state_dicts and the job's own counters, all plain tensors and numbers (read back with
#: ``torch.load(weights_only=True)``).
STATE_FILE = "training_state.pt"


def worker_plan(
    gpus_in_cluster: float, workers: int, gpus_per_worker: float | None, torch_threads: int | None
) -> tuple[float, int | None]:
    """GPUs per training worker and torch threads per worker (None: torch's default).

    Args:
        gpus_in_cluster: ``ray.cluster_resources()["GPU"]`` (0 where there is none).
        workers: data-parallel workers.
        gpus_per_worker: the user's ``--gpus-per-worker``; None: 1 where the cluster has
            GPUs, else 0 (CPU training).
        torch_threads: the user's ``--torch-threads``; None: on CPU, this machine's cores
            shared among the workers (two workers on a 2-core machine must not each start 2).

    Example:
        >>> worker_plan(4, 2, None, None)
        (1.0, None)
        >>> worker_plan(0, 1, None, 3)
        (0.0, 3)
    """
    from memscore.stages.predict import local_cores

    gpus = (1.0 if gpus_in_cluster else 0.0) if gpus_per_worker is None else gpus_per_worker
    threads = torch_threads or (None if gpus else max(1, local_cores() // workers))
    return gpus, threads


def fit(
    entry: Callable[[dict], None],
    spec: Any,
    *,
    run_dir: str,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    max_failures: int,
    datasets: Mapping[str, Any],
    datasets_to_split: list[str],
    storage_options: Mapping[str, Any],
):
    """Run ``entry({"spec": spec})`` on ``workers`` Ray Train workers; return Ray's ``Result``.

    Ray Train keeps its checkpoints under ``run_dir/ray_train`` (local or a URL), the latest
    epoch only: it is what a resumed run needs (each job keeps its best model apart, in
    ``best/``). Running this again on the same ``run_dir`` resumes from that epoch.

    Args:
        entry: the training function each worker runs (a module-level function).
        spec: the job's picklable training spec, handed to ``entry`` as ``config["spec"]``.
        run_dir: the run's folder.
        workers, cpus_per_worker, gpus_per_worker: the worker group (``worker_plan``).
        max_failures: times Ray Train restarts the workers from the latest checkpoint after a
            worker or node dies.
        datasets: Ray Datasets by name (``ray.train.get_dataset_shard(name)`` on a worker).
        datasets_to_split: those streamed in shards across the workers; the others are read
            whole by every worker.
        storage_options: fsspec options for a URL ``run_dir``.

    Raises:
        MemscoreError: the first line of the worker's error, when training fails.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train_path, train_fs = storage.for_pyarrow(run_dir, storage_options)
    if not storage.is_url(run_dir):
        train_path = os.path.abspath(train_path)
    gpu = {"GPU": gpus_per_worker} if gpus_per_worker else {}
    trainer = TorchTrainer(
        train_loop_per_worker=entry,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpus_per_worker > 0,
            resources_per_worker={"CPU": cpus_per_worker, **gpu},
        ),
        run_config=RunConfig(
            name="ray_train",
            storage_path=train_path,
            storage_filesystem=train_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets=dict(datasets),
        dataset_config=DataConfig(datasets_to_split=list(datasets_to_split)),
    )
    try:
        return trainer.fit()
    except Exception as exc:  # Ray wraps the worker's error; keep its first line
        raise MemscoreError(f"training failed: {first_line(exc)}") from exc


def restore_state(module, state: dict[str, Any]) -> dict | None:
    """On a worker: load Ray Train's latest checkpoint, if any, into ``module`` and ``state``.

    ``state`` (the job's counters, with a ``starts`` list) is updated in place with the
    checkpoint's, and the epoch this start begins at is appended to ``starts`` (so a run's
    summary shows where it was resumed or restarted). Returns the optimizer's saved state_dict
    for the caller to load once it has built the optimizer, or None on a fresh start.
    """
    import ray.train
    import torch

    optimizer_state = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            saved = torch.load(
                os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True
            )
        module.load_state_dict(saved.pop("model"), strict=True)
        optimizer_state = saved.pop("optimizer")
        state.update(saved)
    state["starts"] = list(state["starts"]) + [state["epoch"]]
    return optimizer_state


def report_epoch(
    metrics: Mapping[str, Any], module, optimizer, state: Mapping[str, Any], rank: int
) -> None:
    """On a worker: report an epoch's ``metrics`` to Ray Train, with rank 0's checkpoint of
    ``module``, ``optimizer`` and ``state`` (every worker must call it: it is a barrier)."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            torch.save(
                {"model": module.state_dict(), "optimizer": optimizer.state_dict(), **state},
                os.path.join(folder, STATE_FILE),
            )
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(dict(metrics), checkpoint=checkpoint)


def gather_across_workers(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate each worker's arrays on every worker (torch.distributed, any backend)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return {key: np.concatenate([p[key] for p in parts]) for key in values}
