"""The scoring job: manifest -> Ray Data read -> CPU decode tasks -> model actor pool -> Parquet.

``score(config)`` is what ``memscore score`` and ``jobs/score.py`` call. Everything that can be
checked without the cluster (config, weights files, manifest, output folder) is checked first,
so a bad run fails in seconds with one line instead of after the cluster has spun up.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from memscore import storage
from memscore.columns import BOOKKEEPING, score_column
from memscore.errors import MemscoreError, counted, first_line
from memscore.models._api import file_sha256
from memscore.runtime.cluster_check import check_shared_storage

# run_stopped lives in memscore.runtime.failures; importable from here for code written before.
from memscore.runtime.failures import run_stopped  # noqa: F401
from memscore.runtime.ray_start import init_ray
from memscore.scoring.config import ScoreConfig
from memscore.sinks import DEFAULT_FORMAT, format_in, open_sink, resume
from memscore.sinks.folder import (
    SummaryUnreadable,
    check_output_location,
    package_versions,
    prepare_output,
    read_summary,
    remove_summary,
    write_summary,
)
from memscore.sinks.lease import Lease, acquire_lease
from memscore.sources.manifest import Manifest, manifest_fingerprint, open_manifest
from memscore.sources.snapshot import Snapshot
from memscore.stages.error_fraction import MIN_ROWS, start_counter
from memscore.stages.fetch import RETRYABLE_KINDS
from memscore.stages.pipeline import (
    decode_stage,
    light_cpu_share,
    model_actor_pool,
    plan_model_actors,
)

__all__ = ["ModelStage", "score", "run_identity", "weights_record", "incomplete_line"]


@dataclass(frozen=True)
class ModelStage:
    """Another class than ``ScoreImages`` on the model actors, for a job that is a scoring run
    with more columns (``memscore features``: the score and each layer's activations). It gets
    ``ScoreImages``' arguments plus ``kwargs``, and writes ``columns`` (name -> Arrow type, in
    output order) before the bookkeeping columns. ``identity`` joins the run's identity, so a
    ``--resume`` with other settings is refused."""

    actor: type
    kwargs: dict[str, Any]
    columns: dict[str, Any]
    identity: dict[str, Any]


def run_identity(manifest: Manifest, config: ScoreConfig) -> dict[str, Any]:
    """What a run is; a resumed run must match it exactly."""
    return {
        "manifest": manifest.source,
        "manifest_fingerprint": manifest_fingerprint(manifest),
        "path_column": config.path_column,
        "id_column": config.id_column,
        "models": list(config.models),
        "weights": config.weights,
        "column_prefix": config.column_prefix,
        # decode options change scores: one output never mixes two decodes
        "fast_decode": config.fast_decode,
        "exif_transpose": config.exif_transpose,
        "precision": config.precision,
        "limit": config.limit,
        # recorded only when given, so that runs recorded before these options stay the same run
        **({"image_column": config.image_column} if config.image_column else {}),
        **({"keep_image_column": True} if config.keep_image_column else {}),
        "output_format": config.output_format,
        # recorded only with --maps: a run before maps existed stays the same run
        **({"maps": config.map_settings().record()} if config.maps else {}),
    }


def weights_record(config: ScoreConfig) -> list[dict[str, Any]]:
    """Which weights file each model uses; raises MemscoreError when one is missing.

    A traces model's weights are a folder (``FolderWeights``): its record names the folder
    and, already, its ``weights_sha256`` (over its tensors and settings), which a resumed run
    must match (``score``), instead of one file hashed while the run goes."""
    from memscore.models._api import FolderWeights, WeightsNotFoundError, output_columns_of
    from memscore.models.checkpoint import read_checkpoint_info, state_dict_file
    from memscore.models.registry import is_checkpoint, weights_for

    records = []
    for name, given in config.model_weights().items():
        extra = {}
        try:
            weights = weights_for(name, given, config.storage_options)
            if isinstance(weights, FolderWeights):
                path, chosen = weights.folder, weights.name
                licence = weights.meta.get("licence")
                extra = {
                    "weights_source": weights.source,
                    "weights_sha256": weights.sha256(config.storage_options),
                }
            elif is_checkpoint(name, given):
                try:
                    path = state_dict_file(given, config.storage_options)
                except FileNotFoundError as exc:
                    raise MemscoreError(f"--weights: {exc}") from None
                info = read_checkpoint_info(given, config.storage_options) or {}
                chosen = "checkpoint"
                licence = info.get("licence", "the checkpoint's own")
            else:
                path, chosen = str(weights.path()), weights.name
                licence = weights.meta.get("licence")
        except (ValueError, WeightsNotFoundError) as exc:
            raise MemscoreError(first_line(exc)) from None
        columns = [score_column(c, config.column_prefix) for c in output_columns_of(weights.meta)]
        records.append(
            {
                "model": name,
                "weights": chosen,
                "weights_file": path,
                **(
                    {"output_column": columns[0]}
                    if len(columns) == 1
                    else {"output_columns": columns}
                ),
                "preprocessing": weights.name,  # the weights member whose pipeline scores it
                "licence": licence,
                **extra,
            }
        )
    return records


def build_dataset(
    config: ScoreConfig,
    manifest: Manifest,
    snapshot: Snapshot,
    plan: dict[str, Any],
    error_counter=None,
    stage: ModelStage | None = None,
):
    """The lazy Ray Dataset of output rows (nothing runs until it is written)."""
    from memscore.models.registry import weights_for
    from memscore.stages.predict import ScoreImages

    # Ray merges small files into one read block, and one block is one decode task: cut the
    # rows back into blocks of rows_per_block (a streaming repartition, no barrier) so decoding
    # runs in parallel and overlaps the model from the first block on.
    dataset = manifest.dataset(
        snapshot,
        reserved_columns=tuple(added_columns(config, stage)),
        counts_folder=resume.shard_counts_folder(config.output),
    )
    dataset = light_cpu_share(dataset.repartition(target_num_rows_per_block=config.rows_per_block))
    preprocess = {
        name: weights_for(name, given, config.storage_options).transforms
        for name, given in config.model_weights().items()
    }
    dataset = decode_stage(dataset, config, manifest, preprocess, manifest.base_dir, error_counter)
    return dataset.map_batches(
        stage.actor if stage else ScoreImages,
        fn_constructor_kwargs={
            "models": tuple(config.models),
            "weights": config.model_weights(),
            "column_prefix": config.column_prefix,
            "use_gpu": plan["use_gpu"],
            "torch_threads": config.torch_threads,
            "storage_options": dict(config.storage_options),
            "batch_size": config.batch_size,
            "precision": config.precision,
            "maps": config.map_settings(),
            **(stage.kwargs if stage else {}),
        },
        batch_format="pyarrow",
        # Whole decoded blocks per call, the forward in --batch-size chunks inside it (see
        # predict.py): no copy of each block's pixels into batch_size slices and one call per
        # block, not one per slice (blocks are --rows-per-block rows, so a batch of that size
        # is a block as it is). A --batch-size above the block size still has Ray merge
        # blocks to fill a forward pass. (Ray wants a number here for GPU stages.)
        batch_size=max(config.batch_size, config.rows_per_block),
        compute=model_actor_pool(plan),
        num_gpus=plan["num_gpus"],
        num_cpus=plan["num_cpus"],
    )


def added_columns(config: ScoreConfig, stage: ModelStage | None = None) -> list[str]:
    """The columns a run adds to each manifest row: the models' (or the stage's), then the
    bookkeeping columns."""
    from memscore.stages.predict import output_columns

    if stage is None:
        return output_columns(config.models, config.column_prefix, config.maps)
    return [*stage.columns, *BOOKKEEPING]


def _reopen(config: ScoreConfig, manifest: Manifest, identity: dict[str, Any]) -> bool:
    """``--resume --retry-errors`` on a finished run: make it an interrupted run again (its
    snapshot, state and checkpoint, which went when it finished) without the rows whose error
    kind is in ``RETRYABLE_KINDS``. False, touching nothing, when there are none.

    The summary goes only after the new checkpoint and the replacement plan are written, so
    a kill before leaves a finished run, and one after an interrupted run whose plan every
    resume completes."""
    snapshot = _new_snapshot(manifest, config)
    resume.write_state(config.output, identity, snapshot, config.storage_options)
    dropped = resume.drop_error_rows(
        config.output, config.storage_options, RETRYABLE_KINDS, rebuild_checkpoint=True
    )
    if not dropped:
        resume.remove_work_dir(config.output, config.storage_options)
        return False
    return True  # the caller removes the summary, then applies the plan


def _new_snapshot(manifest: Manifest, config: ScoreConfig) -> Snapshot:
    """The rows this run scores: the manifest copied into the work folder, or the shards."""
    return manifest.freeze(
        resume.snapshot_folder(config.output),
        limit=config.limit,
        rows_per_file=config.rows_per_file,
        id_column=config.id_column,
    )


def incomplete_line(output: str, rows: int, counts: dict[str, Any]) -> str:
    """The one line for an output whose final count is not every row exactly once, with the
    way on that fits what is wrong."""
    parts = []
    if counts["rows_missing"]:
        parts.append(
            f"{counts['rows_missing']} missing (e.g. {resume.ROW_COLUMN} "
            f"{counts['missing_examples']})"
        )
    if counts["rows_duplicated"]:
        parts.append(
            f"{counts['rows_duplicated']} written more than once (e.g. "
            f"{counts['duplicated_examples']})"
        )
    if counts["rows_unexpected"]:
        parts.append(
            f"{counts['rows_unexpected']} not in the manifest (e.g. "
            f"{counts['unexpected_examples']})"
        )
    line = (
        f"{output}: {counted(counts['rows_out'], 'row')} written for {rows} manifest rows: "
        + ", ".join(parts)
    )
    if counts["rows_duplicated"]:
        return (
            line + "; another run wrote into this output at the same time (an older "
            "memscore, or a storage that ignores conditional writes): run again with "
            "--resume, which keeps one copy of each row"
        )
    return line + "; run again with --resume"


def _resumed_snapshot(
    config: ScoreConfig, manifest: Manifest, identity: dict[str, Any], notes: list[str]
) -> Snapshot:
    """The snapshot an interrupted run resumes from: its state's, once the state is checked
    to be this run's; or, where the state is unreadable or gone (a cut-short state.json, or a
    finished run whose summary was unreadable), a state rebuilt from this command."""
    try:
        state = resume.read_state(config.output, config.storage_options)
    except resume.StateUnreadable as exc:
        notes.append(str(exc).split(";")[0] + "; rebuilt from this command")
        state = None
    if state is not None:
        return resume.check_same_run(state, identity, config.output)
    return _rebuild_state(config, manifest, identity)


def _rebuild_state(config: ScoreConfig, manifest: Manifest, identity: dict[str, Any]) -> Snapshot:
    """A lost state made again: the manifest snapshot written anew, every committed row checked
    to be the snapshot's row of its ``memscore_row`` (by its path: a manifest changed since is
    refused), Ray's checkpoint rebuilt from the output files where it went with the work
    folder, and the state written. What cannot be checked is the options that left no trace in
    the files (decode options, precision): they are this command's."""
    snapshot = _new_snapshot(manifest, config)
    if manifest.row_ids_are_positions:  # a snapshot row for each committed row to match
        resume.check_rows_match(
            config.output, snapshot, manifest.path_column, config.storage_options
        )
    if open_sink(
        config.output, config.storage_options, config.output_format
    ).files() and not resume.committed_rows(config.output, config.storage_options):
        resume.rebuild_checkpoint(config.output, config.storage_options)
    resume.write_state(config.output, identity, snapshot, config.storage_options)
    return snapshot


def score(config: ScoreConfig, stage: ModelStage | None = None) -> dict[str, Any]:
    """Score every row of ``config.manifest`` and write Parquet plus a summary to ``config.output``.

    Args:
        config: the run's options; validated here before any Ray work.
        stage: what runs on the model actors, when not ``ScoreImages`` (see ``ModelStage``).

    Returns:
        The run summary, as written to ``_memscore.json``, plus ``work_done`` (False: a
        ``--resume`` found the run complete and did nothing).

    Example:
        >>> import memscore
        >>> summary = memscore.score(memscore.ScoreConfig("examples/images", output="scores/"))
        >>> summary["rows_out"] == summary["rows_in"]
        True
    """
    started = dt.datetime.now(dt.timezone.utc)
    config = config.validated()
    weights = weights_record(config)
    added = added_columns(config, stage)
    manifest = open_manifest(
        config.manifest,
        path_column=config.path_column,
        storage_options=config.storage_options,
        reserved_columns=(*added, resume.ROW_COLUMN),
        rows_in_driver=False,
        image_column=config.image_column,
        keep_image_column=config.keep_image_column,
    )
    manifest.check_run_options(limit=config.limit, id_column=config.id_column)
    if config.id_column and config.id_column not in manifest.columns:
        raise MemscoreError(
            f"{config.manifest}: no --id-column {config.id_column!r} "
            f"(columns: {', '.join(manifest.columns)})"
        )
    check_output_location(
        config.output, storage_options=config.storage_options, inputs=(config.manifest,)
    )
    # One writer per output, for the whole run: a second run (or a --resume while this one
    # goes on) is refused here, before it reads or writes anything of the output.
    lease = acquire_lease(
        config.output, config.storage_options, take_over=config.resume or config.overwrite
    )
    lease.stop_run_when_lost()
    if config.output_format is None:  # a new run's is the default, a resumed run keeps its own
        found = format_in(config.output, config.storage_options) if config.resume else None
        config = dataclasses.replace(config, output_format=found or DEFAULT_FORMAT)
    try:
        return _score_holding(config, manifest, weights, added, lease, started, stage)
    except KeyboardInterrupt:
        if lease.lost is None:
            raise
        raise MemscoreError(
            f"--output {config.output}: the run stopped because {lease.lost}; once no other "
            f"run writes there, check it with memscore verify and finish it with --resume"
        ) from None
    finally:
        lease.release()


def _lease_notes(lease: Lease) -> list[str]:
    notes = []
    if lease.took_over is not None:
        notes.append(
            f"took over the lease of a memscore run that is gone ({lease.took_over.describe()})"
        )
    if lease.unconditional:
        notes.append(
            f"the storage of {lease.output} ignores conditional writes "
            f"(If-None-Match): two runs writing there at once are not excluded"
        )
    return notes


def _score_holding(
    config: ScoreConfig,
    manifest: Manifest,
    weights: list[dict[str, Any]],
    added: list[str],
    lease: Lease,
    started: dt.datetime,
    stage: ModelStage | None = None,
) -> dict[str, Any]:
    """``score``'s work, once this process holds the output's lease."""
    import ray
    from ray.data import DataContext

    notes = _lease_notes(lease)
    mode = prepare_output(
        config.output,
        overwrite=config.overwrite,
        resume=config.resume,
        storage_options=config.storage_options,
        inputs=(config.manifest,),
    )
    identity = run_identity(manifest, config)
    if stage is not None:
        identity["stage"] = stage.identity
    folders = {r["model"]: r["weights_sha256"] for r in weights if "weights_source" in r}
    if folders:  # a folder's contents, not only its name, make the run (traces models)
        identity["weights_sha256"] = folders
    reopened = False
    if mode == "complete":
        try:
            finished = read_summary(config.output, config.storage_options)
        except SummaryUnreadable as exc:
            # Every committed row is on disk: the run is finished from them, as an
            # interrupted one (its state, or one rebuilt below when it is gone too).
            notes.append(str(exc).split(";")[0] + "; finishing the run from its committed files")
            finished = {"status": "unreadable"}
        if finished.get("status") == "complete":
            resume.check_same_run(finished.get("run") or {}, identity, config.output, finished=True)
            if not (config.retry_errors and _reopen(config, manifest, identity)):
                return {**finished, "work_done": False}  # said by the CLI's final line
            reopened = True
        remove_summary(config.output, config.storage_options)
        mode = "resume"
    # Before anything is written into the output: a cluster whose nodes cannot all see it
    # (or the images) stops here, leaving nothing to clean up.
    init_ray(config.address)
    check_shared_storage(config.output, manifest, config.storage_options)  # >1 node only
    if mode == "resume":
        snapshot = _resumed_snapshot(config, manifest, identity, notes)
        resume.apply_retry_plan(config.output, config.storage_options)  # one a kill cut short
        resume.committed_rows(config.output, config.storage_options)  # repairs renames
        # An output two runs wrote at once (an older memscore, or a storage that ignores
        # conditional writes) keeps one copy of each row, through the checkpoint.
        doubled = resume.drop_duplicate_rows(config.output, config.storage_options)
        if doubled:
            resume.apply_retry_plan(config.output, config.storage_options)
            notes.append(
                f"removed {counted(doubled, 'second copy', 'second copies')} of "
                f"rows that two runs had written into {config.output}"
            )
        if config.retry_errors and not reopened:
            resume.drop_error_rows(config.output, config.storage_options, RETRYABLE_KINDS)
            resume.apply_retry_plan(config.output, config.storage_options)
    else:
        snapshot = _new_snapshot(manifest, config)
        resume.write_state(config.output, identity, snapshot, config.storage_options)
    done_before = resume.committed_rows(config.output, config.storage_options)

    context = DataContext.get_current()
    # A failed block must fail the run, never be skipped: per-row problems are already data.
    context.max_errored_blocks = 0
    waited = context.wait_for_min_actors_s
    joined = bool(config.address or os.environ.get("RAY_ADDRESS"))
    plan = plan_model_actors(config, ray.cluster_resources().get("GPU", 0), autoscaling=joined)
    if joined and plan["use_gpu"] and plan["actors"] > ray.cluster_resources().get("GPU", 0):
        # Waiting for GPU nodes to boot (minutes), but not for ever on a cluster that cannot
        # grow: then the run fails with Ray's "Timed out while starting actors".
        context.wait_for_min_actors_s = int(os.environ.get("MEMSCORE_WAIT_FOR_GPUS_S", 1800))

    # Hashing a 0.5 GB weights file takes seconds: do it while the cluster works.
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashes = pool.map(
            lambda record: (
                record.get("weights_sha256")
                or file_sha256(record["weights_file"], storage_options=config.storage_options)
            ),
            weights,
        )
        clock = time.perf_counter()
        context.checkpoint_config = resume.checkpoint_config(config.output, config.storage_options)
        # (shards: rows unknown until read; the tally's own minimum decides when it judges)
        counter = start_counter(
            config.max_error_fraction,
            MIN_ROWS if snapshot.rows is None else snapshot.rows - done_before,
        )
        try:
            open_sink(config.output, config.storage_options, config.output_format).write(
                build_dataset(config, manifest, snapshot, plan, counter, stage),
                config.rows_per_file,
            )
        except Exception as exc:
            # a Ray task's failure the user can act on (full disk, storage outage, mostly
            # errors) as one line; anything else goes up whole, for guarded or --debug
            stopped = run_stopped(exc, output=config.output)
            if stopped is None:
                raise
            raise MemscoreError(stopped) from None
        finally:
            context.checkpoint_config = None  # the context outlives this run in the process
            context.wait_for_min_actors_s = waited
            if counter is not None:
                ray.kill(counter)
        wall = time.perf_counter() - clock
        for record, digest in zip(weights, hashes):
            record["weights_sha256"] = digest

    # what the run read: its rows, the ids they may have, what the source records of them
    read = manifest.rows_read(
        snapshot, resume.shard_counts_folder(config.output), output=config.output
    )
    snapshot = Snapshot(snapshot.files, read.rows)
    counts = open_sink(config.output, config.storage_options, config.output_format).count(
        [c for c in added if c not in BOOKKEEPING], expected_rows=read.expected_ids
    )
    recorded = asdict(config)
    recorded["storage_options"] = storage.redact(config.storage_options)
    done_now = counts["rows_out"] - done_before
    summary = {
        "status": "complete" if counts["complete"] else "rows missing or duplicated",
        "manifest": config.manifest,
        # where the manifest's relative image paths resolve: `memscore evaluate` joins the
        # output's paths to a truth table's by it when the two name the images differently
        "manifest_base_dir": manifest.base_dir,
        "manifest_kind": manifest.kind,
        "output": config.output,
        "models": weights,
        # --maps: the method and its settings (also in "run", which --resume compares)
        **({"maps": identity["maps"]} if "maps" in identity else {}),
        "rows_in": snapshot.rows,
        "non_image_files_skipped": manifest.skipped_files,
        **counts,
        "resumed": mode == "resume",
        "rows_done_before_resume": done_before,
        "rows_done_this_run": done_now,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(done_now / wall, 3) if wall > 0 else None,
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "model_actors": plan["actors"],
        "gpus_per_actor": plan["num_gpus"],
        "versions": package_versions(),
        "config": recorded,
        "run": identity,  # what --resume and memscore verify compare a later command with
        "run_id": lease.run_id,
        "warnings": notes,
    }
    summary.update(read.summary)  # what `memscore verify` checks the output against, if any
    write_summary(config.output, summary, config.storage_options)
    if not counts["complete"]:
        raise MemscoreError(incomplete_line(config.output, snapshot.rows, counts))
    resume.remove_work_dir(config.output, config.storage_options)
    return {**summary, "work_done": True}  # not in _memscore.json: what this call did
