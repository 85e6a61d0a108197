"""The stages that scoring, fine-tuning and train-sae share, and how a job starts Ray.

- ``decode_batch`` / ``decode_stage``: the CPU decode stage (``memscore.stages.decode.DecodeImages``)
  as stateless Ray tasks; one image pipeline for every job.
- ``plan_model_actors`` / ``model_actor_pool``: how many model actors, what each asks Ray for.
- ``light_cpu_share``: a small-table stage asking Ray for a light CPU share.

Ray pickles ``decode_batch`` by reference to this module (``memscore.stages.pipeline.decode_batch``),
so every worker imports it from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from memscore.errors import MemscoreError

if TYPE_CHECKING:  # an annotation only: the stages import nothing of the sources at run time
    from memscore.sources.base import Source as Manifest

__all__ = [
    "decode_batch",
    "decode_stage",
    "plan_model_actors",
    "ActorOptions",
    "DecodeOptions",
    "LIGHT_STAGE_CPUS",
]

#: The CPU share Ray accounts for memscore's bookkeeping stages: reading the snapshot or the
#: shards, cutting rows into decode blocks, writing output files. See ``light_cpu_share``.
LIGHT_STAGE_CPUS = 0.25


class ActorOptions(Protocol):
    """What ``plan_model_actors`` reads of a job's config (``ScoreConfig``'s fields of these
    names): the stages know no job's config, only the options they take."""

    num_gpus: float | None
    gpus_per_actor: float
    actors: int | None
    min_actors: int | None


class DecodeOptions(Protocol):
    """What ``decode_stage`` reads of a job's config: the decode options that ``ScoreConfig``,
    ``FinetuneConfig`` and ``TrainSAEConfig`` each carry. ``transient_retry_s`` is read where
    the config has it (scoring's), else ``fetch.DEFAULT_TRANSIENT_RETRY_S``."""

    max_pixels: int
    rows_per_block: int
    decode_batch_size: int
    io_threads: int
    fast_decode: bool
    exif_transpose: bool
    storage_options: Mapping[str, Any]


def decode_batch(table: pa.Table, error_counter=None, **decode_kwargs) -> pa.Table:
    """The CPU decode stage as a plain function, so Ray runs it as stateless tasks anywhere.

    ``error_counter``: the run's ``error_fraction`` actor, told each block's errors (None: no
    check)."""
    from memscore.columns import ERROR as ERROR_COLUMN
    from memscore.faults import maybe_inject
    from memscore.stages.decode import DecodeImages

    maybe_inject("decode")
    table = DecodeImages(**decode_kwargs)(table)
    if error_counter is not None:
        from memscore.stages.error_fraction import report

        report(error_counter, table.column(ERROR_COLUMN))
    return table


def plan_model_actors(
    config: ActorOptions, cluster_gpus: float, autoscaling: bool = False
) -> dict[str, Any]:
    """How many model actors, and what each asks Ray for.

    ``cluster_gpus`` are the GPUs the cluster has now. With ``autoscaling`` (a run joining a
    cluster), ``--num-gpus`` above that plans the GPU actors anyway and they wait for the
    autoscaler to add GPU nodes; on a local Ray it is an error.

    GPU runs: model actors go only where GPUs are (each asks for ``gpus_per_actor`` GPUs), one
    per ``gpus_per_actor`` GPUs among those used (all by default), so every GPU holds one model;
    ``actors`` sets the count instead (more than the GPUs present waits for more, e.g. from the
    cluster autoscaler). CPU runs: ``actors`` (default 1) actors, each taking one CPU slot in
    Ray's accounting while torch uses every core, leaving the other slots to decode tasks.

    The pool has a fixed size unless ``min_actors`` is given (an autoscaling range
    ``min_actors..actors``). Fixed by default, both measured on Ray 2.60 with two GPU nodes:
    a fixed pool survives losing a node (the lost actor waits to restart while the others go
    on; its in-flight batches run once a GPU is free again, at the latest when the others are
    released at the end), and an autoscaling pool stopped a loaded GPU actor when decoding fell
    behind (utilisation 0.5) only to start a new one, loading the model again, 11 s later.

    Returns:
        ``actors`` (the pool's starting and largest size), ``min_actors``, and each actor's
        ``num_gpus``, ``num_cpus`` and ``use_gpu``.
    """
    gpus = cluster_gpus if config.num_gpus is None else min(config.num_gpus, cluster_gpus)
    if config.num_gpus and config.num_gpus > cluster_gpus:
        if not autoscaling:
            raise MemscoreError(
                f"--num-gpus {config.num_gpus:g} but the cluster has {cluster_gpus:g} GPUs"
            )
        # A launcher cluster whose GPU workers scale from zero has no GPU when the job starts:
        # the pending GPU actors are the demand that makes the autoscaler start the nodes.
        gpus = config.num_gpus
    if gpus > 0:
        actors = config.actors or max(1, int(gpus // config.gpus_per_actor))
        plan = {"num_gpus": config.gpus_per_actor, "num_cpus": 1, "use_gpu": True}
    else:
        actors = config.actors or 1
        plan = {"num_gpus": 0, "num_cpus": 1, "use_gpu": False}
    return {"actors": actors, "min_actors": min(config.min_actors or actors, actors), **plan}


def decode_task_memory(config: DecodeOptions, preprocess: dict) -> int:
    pixels = 2 * config.max_pixels * 3
    arrays = config.rows_per_block * sum(int(np.prod(p.array_shape)) for p in preprocess.values())
    return pixels + arrays + (64 << 20)  # + bytes read and Python's own


def decode_stage(
    dataset,
    config: DecodeOptions,
    manifest: Manifest,
    preprocess: dict,
    base_dir: str | None,
    error_counter=None,
):
    """``dataset`` -> the same rows decoded: the CPU decode stage, as Ray tasks.

    Shared by scoring and the training jobs (one image pipeline). ``config`` is any object
    with the decode options (``DecodeOptions``: a job's config); ``preprocess`` maps each model
    name to the preprocessing whose uint8 arrays the stage adds; relative paths resolve against
    ``base_dir`` (None: the paths are already resolved). ``error_counter``: an
    ``error_fraction.start_counter`` actor the tasks report their errors to (None: no limit).

    A task whose rows keep failing transiently (``fetch.TransientFailure``, after
    ``transient_retry_s`` of backoff inside the task) fails, and with it the run. Ray itself
    does not retry it: Ray Data's tasks retry system failures (a lost node) without limit, and
    ``retry_exceptions`` would share that unbounded count, so expired credentials would retry
    for ever. The bounded retry is the task's own.
    """
    from memscore.stages.fetch import DEFAULT_TRANSIENT_RETRY_S

    return dataset.map_batches(
        decode_batch,
        fn_kwargs={
            "error_counter": error_counter,
            "transient_retry_s": getattr(config, "transient_retry_s", DEFAULT_TRANSIENT_RETRY_S),
            "max_inflight_pixels": 2 * config.max_pixels,
            # where a row's image is: its path (resolved against base_dir), or bytes it carries
            **manifest.image_reading(),
            "preprocess": preprocess,
            "base_dir": base_dir,
            "storage_options": dict(config.storage_options),
            "max_pixels": config.max_pixels,
            "io_threads": config.io_threads,
            "fast_decode": config.fast_decode,
            "exif_transpose": config.exif_transpose,
        },
        batch_format="pyarrow",
        batch_size=config.decode_batch_size,
        num_cpus=1,
        # What one decode task can hold at worst: its pixel budget of decoded RGB images, plus
        # the block's model-input arrays. Reserving it keeps a node from running more decode
        # tasks than its memory holds, and (remote arguments differing) keeps Ray from fusing
        # decoding into the model actors, which would serialise decode and model and put
        # decoding on GPU actors.
        memory=decode_task_memory(config, preprocess),
    )


def light_cpu_share(dataset):
    """``dataset`` with its last stage (the streaming repartition) asking Ray for a light CPU
    share, ``LIGHT_STAGE_CPUS``, as the snapshot read does.

    Why: Ray Data reserves each stage's resources in pipeline order, upstream first, and a stage
    left without a reservation waits for what is unreserved. The read and the repartition
    only move small tables; at a whole CPU each, with a decode task and the model actor, they
    took everything a one-machine Ray has (the writer's side of this is in
    ``memscore.sinks.parquet.ParquetSink.write``). The repartition's CPU request has no public setter in Ray 2.60
    (the version pyproject pins): its logical operator's ``ray_remote_args`` is set here.
    What it is for is tested end to end by tests/test_resume.py's
    ``test_a_large_run_commits_as_it_goes...`` (files committed while the read still runs).
    """
    operator = dataset._logical_plan.dag
    operator.ray_remote_args["num_cpus"] = LIGHT_STAGE_CPUS
    return dataset


def model_actor_pool(plan: dict[str, Any]):
    """The model stage's ActorPoolStrategy (see ``plan_model_actors``).

    Two tasks in flight per actor (Ray Data's default for an actor that runs one call at a
    time, stated here because the GPU's utilisation depends on it): one batch runs while the
    next one's block is pulled to the actor's node, so a GPU does not wait on a transfer. A
    decoded row is 227x227x3 uint8 = 151 KiB (MemNet's 256x256x3: 192 KiB), so at the default
    ``--rows-per-block 256`` an actor holds 2 x 38 MiB of pixels. Decoded blocks waiting for a
    free actor count against Ray Data's object-store budget, half of the object store (which
    is 30% of a node's RAM by default): on a 64 GB node about 9 GiB, some 60,000 decoded rows,
    enough queued per GPU to ride out slow S3 reads, and bounded, so decoding slows down
    instead of spilling to disk when the GPUs fall behind. No object-store setting is needed.

    Lost actors (a node gone, a process killed) are restarted by Ray Data's defaults
    (``max_restarts=-1``, ``max_task_retries=-1``) and their tasks run again; a lost write
    task's retry writes the same file name (Ray names it by write id and task index), so no
    row is written twice (tests/test_multinode.py removes a GPU node mid-run).
    """
    from ray.data import ActorPoolStrategy

    if plan["min_actors"] == plan["actors"]:
        return ActorPoolStrategy(size=plan["actors"], max_tasks_in_flight_per_actor=2)
    # An autoscaling range starts at its top, one actor per GPU, rather than growing from the
    # minimum: the decode stage has work for all of them from the first blocks on.
    return ActorPoolStrategy(
        min_size=plan["min_actors"],
        max_size=plan["actors"],
        initial_size=plan["actors"],
        max_tasks_in_flight_per_actor=2,
    )
