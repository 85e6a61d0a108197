"""Resumable runs: a run's state beside its output, plus Ray Data's own checkpointing.

Every run works in ``<output>/_memscore/`` (Parquet readers skip ``_`` folders):

- ``manifest/part-NNNNNN.parquet``: the manifest's frozen copy the run reads
  (``snapshot.py``; ``snapshot_folder``).
- ``state.json``: written once the snapshot is complete; what the run is (manifest fingerprint,
  models, options), so that ``--resume`` refuses to continue a different run.
- ``checkpoint/``: Ray Data's ``CheckpointConfig`` files, the ``memscore_row`` ids of rows whose
  output file is committed. Ray writes a ``.pending`` id file before each output file and
  renames it after, and on restart deletes output files of pending ids and skips committed ids:
  every row ends up in the output exactly once.

After a run's summary is written the folder is deleted.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memscore import columns, storage
from memscore.errors import MemscoreError
from memscore.sinks import open_sink
from memscore.sinks.folder import WORK_DIR
from memscore.sources.snapshot import Snapshot

__all__ = [
    "ROW_COLUMN",
    "WORK_DIR",
    "StateUnreadable",
    "snapshot_folder",
    "shard_counts_folder",
    "read_state",
    "write_state",
    "check_same_run",
    "checkpoint_config",
    "committed_rows",
    "remove_work_dir",
    "drop_error_rows",
    "drop_duplicate_rows",
    "rebuild_checkpoint",
    "check_rows_match",
    "apply_retry_plan",
]

ROW_COLUMN = columns.ROW
_STATE = "state.json"


def _work(output: str, *parts: str) -> str:
    return storage.join(output, WORK_DIR, *parts)


def snapshot_folder(output: str) -> str:
    """Where a run's manifest snapshot goes (``snapshot.write_snapshot``)."""
    return _work(output, "manifest")


def shard_counts_folder(output: str) -> str:
    """Where a WebDataset run's read tasks record each shard's sample count."""
    return _work(output, "shards")


def write_state(
    output: str, identity: Mapping[str, Any], snapshot: Snapshot, storage_options: Mapping[str, Any]
) -> None:
    state = {
        **identity,
        "snapshot_files": list(snapshot.files),
        "rows": snapshot.rows,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    fs, path = storage.url_to_fs(_work(output, _STATE), storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a WebDataset run writes no snapshot
    storage.pipe_atomic(fs, path, json.dumps(state, indent=2).encode())


class StateUnreadable(MemscoreError):
    """An interrupted run's ``state.json`` is there but is not a state (0 bytes or cut short:
    written in place by an older memscore when the disk filled, or damaged since)."""


def read_state(output: str, storage_options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The interrupted run's state, None when there is none; ``StateUnreadable`` when the
    file is not one."""
    fs, path = storage.url_to_fs(_work(output, _STATE), storage_options)
    if not fs.exists(path):
        return None
    data = fs.cat_file(path)
    try:
        state = json.loads(data)
        if isinstance(state, dict):
            return state
    except ValueError:
        pass
    raise StateUnreadable(
        f"{output}/{WORK_DIR}/{_STATE} is unreadable ({len(data)} bytes: cut short when it was "
        f"written); run the same command with --resume to finish the run from its committed "
        f"files"
    )


#: identity keys added after runs were first recorded -> what an older run without them was
_BEFORE_RECORDED = {"output_format": "parquet"}


def check_same_run(
    state: Mapping[str, Any], identity: Mapping[str, Any], output: str, *, finished: bool = False
) -> Snapshot | None:
    """Refuse to resume (or to report as done) a run other than this one.

    ``state`` is an interrupted run's state, or (``finished``) the identity a finished run
    recorded in its summary. Returns the interrupted run's snapshot (None when ``finished``).
    """
    which = "a finished run" if finished else "an interrupted run"
    # what a run recorded before memscore recorded the key: an older run is the same run
    state = {**_BEFORE_RECORDED, **state}
    for key, value in identity.items():
        if key not in state:
            raise MemscoreError(
                f"--output {output} holds {which} that does not record its {key} (made by "
                f"another memscore version); use --overwrite to score again"
            )
        if state[key] != value:
            what = (
                "the manifest's files changed, or an older memscore recorded them by size and time"
                if key == "manifest_fingerprint"
                else (f"{key} was {state[key]!r}, now {value!r}")
            )
            raise MemscoreError(
                f"--output {output} holds {which} that differs from this one ({what}); "
                f"{'run' if finished else 'resume'} it with the same options or use --overwrite"
            )
    if finished:
        return None
    rows = state["rows"]  # None: WebDataset shards, whose rows are known once read
    return Snapshot(tuple(state["snapshot_files"]), None if rows is None else int(rows))


def checkpoint_config(output: str, storage_options: Mapping[str, Any]):
    from ray.data.checkpoint import CheckpointConfig

    path, filesystem = storage.for_pyarrow(_work(output, "checkpoint"), storage_options)
    config = CheckpointConfig(
        id_column=ROW_COLUMN,
        checkpoint_path=path,
        override_filesystem=filesystem,
        # memscore deletes _memscore/ itself, after the summary: a kill between Ray's success
        # and the summary must still find the checkpoint.
        delete_checkpoint_on_success=False,
    )
    # The filter of already-done ids is a binary search; one actor is plenty, and each one
    # holds a CPU that the decode tasks need.
    config.checkpoint_actor_pool_max_size = 1
    return config


def committed_rows(output: str, storage_options: Mapping[str, Any]) -> int:
    """Rows whose output is committed in the checkpoint, after repairing an interrupted rename.

    On an object store Ray's rename of ``X.pending.parquet`` to ``X.parquet`` is a copy then a
    delete; a kill between the two leaves both. The copy means the output file was complete,
    so the stale pending file goes (else Ray would delete that output but keep its ids).
    """
    fs, folder = storage.url_to_fs(_work(output, "checkpoint"), storage_options)
    if not fs.exists(folder):
        return 0
    names = {p.rsplit("/", 1)[-1]: p for p in fs.ls(folder, detail=False)}
    pending = {
        n[: -len(".pending.parquet")]: p for n, p in names.items() if n.endswith(".pending.parquet")
    }
    committed = {
        n[: -len(".parquet")]: p
        for n, p in names.items()
        if n.endswith(".parquet") and not n.endswith(".pending.parquet")
    }
    for stem in pending.keys() & committed.keys():
        fs.rm_file(pending[stem])
    if not committed:
        return 0
    import pyarrow.dataset as pads

    # Footers only, read by pyarrow's thread pool: a driver cost per file, not per row, and
    # on S3 concurrent requests rather than one round trip after another.
    files = pads.dataset(
        sorted(committed.values()), format="parquet", filesystem=storage.pyarrow_filesystem_of(fs)
    )
    return files.count_rows()


def remove_work_dir(output: str, storage_options: Mapping[str, Any]) -> None:
    fs, folder = storage.url_to_fs(_work(output), storage_options)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


# ----------------------------------------------------------------------------- --retry-errors
_RETRY_DIR = "retry-errors"  # in _memscore/: the rewritten files, then plan.json
_PLAN = "plan.json"


def drop_error_rows(
    output: str,
    storage_options: Mapping[str, Any],
    kinds: tuple[str, ...],
    *,
    rebuild_checkpoint: bool = False,
) -> int:
    """Take the rows whose committed ``memscore_error`` is of one of ``kinds`` out of the output
    files and the checkpoint, so that the resumed run scores them again. Returns their count.

    Files without such rows are found from their footers' null counts, not read.
    ``rebuild_checkpoint``: see ``_drop_rows``.
    """
    kinds_re = "^(" + "|".join(re.escape(k) for k in kinds) + "):"

    def errors_of_kinds(sink, path: str, read) -> Any:
        if not sink.may_hold_errors(path):
            return None
        return pc.fill_null(pc.match_substring_regex(read().column(columns.ERROR), kinds_re), False)

    return _drop_rows(
        output, storage_options, errors_of_kinds, rebuild_checkpoint=rebuild_checkpoint
    )


def drop_duplicate_rows(output: str, storage_options: Mapping[str, Any]) -> int:
    """Keep one copy of each row id in the output, taking the others out of the output files
    and the checkpoint; returns how many copies went.

    An output holds a row twice only when two runs wrote into it at once (an older memscore,
    or a storage that ignores conditional writes, so that the lease could not exclude the
    second writer). The first copy, in file name order, is kept: every copy of a row was
    scored from the same snapshot row with the same options, so which one stays does not
    change the output. Only the ids are read to find them (8 bytes per row in the driver);
    only files holding a second copy are rewritten.
    """
    import numpy as np

    sink = open_sink(output, storage_options)
    pending = _pending_stems(output, storage_options)
    ids_of: dict[str, Any] = {}
    for path in sink.files():
        if pending and path.rsplit("/", 1)[-1].startswith(pending):
            continue  # Ray deletes these when the run starts
        ids_of[path] = sink.read_file(path, [ROW_COLUMN]).column(ROW_COLUMN).to_numpy()
    if not ids_of:
        return 0
    values, counts = np.unique(np.concatenate(list(ids_of.values())), return_counts=True)
    repeated = values[counts > 1]
    if not len(repeated):
        return 0
    kept: set[int] = set()

    def second_copies(sink, path: str, read) -> Any:
        ids = ids_of.get(path)
        if ids is None:
            return None
        doubled = np.isin(ids, repeated)
        if not doubled.any():
            return None
        drop = np.zeros(len(ids), dtype=bool)
        for index in np.flatnonzero(doubled):
            value = int(ids[index])
            drop[index] = value in kept
            kept.add(value)
        return pa.array(drop)

    return _drop_rows(output, storage_options, second_copies)


def rebuild_checkpoint(output: str, storage_options: Mapping[str, Any]) -> None:
    """Write Ray's checkpoint id files anew from the output files (a run whose work folder went
    with its summary), so that a resumed run skips every row already written."""
    _drop_rows(output, storage_options, lambda sink, path, read: None, rebuild_checkpoint=True)


def _pending_stems(output: str, storage_options: Mapping[str, Any]) -> tuple[str, ...]:
    """Names that begin the data files of an unfinished write (Ray's ``.pending`` id files):
    Ray deletes those files when the run starts."""
    fs, checkpoint = storage.url_to_fs(_work(output, "checkpoint"), storage_options)
    names = (
        [p.rsplit("/", 1)[-1] for p in fs.ls(checkpoint, detail=False)]
        if fs.exists(checkpoint)
        else []
    )
    return tuple(n[: -len(".pending.parquet")] for n in names if n.endswith(".pending.parquet"))


def _drop_rows(
    output: str, storage_options: Mapping[str, Any], choose, *, rebuild_checkpoint: bool = False
) -> int:
    """Take the rows ``choose`` names out of memscore's output files and the checkpoint.
    Returns their count.

    ``choose(sink, path, read)`` -> None (the file keeps every row) or a boolean array over
    the file's rows (true: drop); ``read()`` reads the whole file (once).

    Only memscore's own files are touched: each output file holding such rows is rewritten
    without them (deleted when none is left), and its checkpoint id file (Ray's
    ``<write id>_<task>.parquet`` in ``_memscore/checkpoint/``, whose name begins the data
    file's) is rewritten with the ids the new file holds. ``rebuild_checkpoint`` (a finished
    run, whose checkpoint went with its work folder): an id file is written for every output
    file.

    Crash-safe as a redo log: the new files are written under ``_memscore/retry-errors/``, then
    ``plan.json`` naming each (new file, target); only then are targets replaced. A run killed
    before the plan leaves the output as it was; after it, ``apply_retry_plan`` (every resume
    calls it) finishes the replacement.
    """
    sink = open_sink(output, storage_options)
    fs = sink.fs
    _, retry = storage.url_to_fs(_work(output, _RETRY_DIR), storage_options)
    _, checkpoint = storage.url_to_fs(_work(output, "checkpoint"), storage_options)
    if fs.exists(retry):
        fs.rm(retry, recursive=True)  # a plan never written: the output was not touched
    names = (
        [p.rsplit("/", 1)[-1] for p in fs.ls(checkpoint, detail=False)]
        if fs.exists(checkpoint)
        else []
    )
    ckpt_names = [n for n in names if n.endswith(".parquet") and ".pending." not in n]
    pending = _pending_stems(output, storage_options)
    plan: list[dict[str, str]] = []
    dropped = 0
    if not storage.is_url(output):  # an object store has no folders to make
        fs.makedirs(checkpoint, exist_ok=True)
        fs.makedirs(retry, exist_ok=True)
    for path in sink.files():
        name = path.rsplit("/", 1)[-1]
        if pending and name.startswith(pending):
            continue
        stem = name[: -len(sink.suffix)]
        ckpt = next(
            (n for n in ckpt_names if name.startswith(n[: -len(".parquet")])), stem + ".parquet"
        )  # Ray's rule: the id file's stem begins the data file's
        whole: list[pa.Table] = []

        def read(path=path, whole=whole) -> pa.Table:
            if not whole:
                whole.append(sink.read_file(path))
            return whole[0]

        drop = choose(sink, path, read)
        count = 0 if drop is None else (pc.sum(pc.cast(drop, "int64")).as_py() or 0)
        if not count:
            if rebuild_checkpoint:
                ids = whole[0] if whole else sink.read_file(path, [ROW_COLUMN])
                _write_ids(fs, f"{checkpoint}/{ckpt}", ids.select([ROW_COLUMN]))
            continue
        kept = read().filter(pc.invert(drop))
        dropped += count
        if kept.num_rows == 0:
            plan += [{"delete": path}, {"delete": f"{checkpoint}/{ckpt}"}]
            continue
        sink.write_file(f"{retry}/data-{name}", kept)
        _write_ids(fs, f"{retry}/ids-{ckpt}", kept.select([ROW_COLUMN]))
        plan += [
            {"move": f"{retry}/data-{name}", "to": path},
            {"move": f"{retry}/ids-{ckpt}", "to": f"{checkpoint}/{ckpt}"},
        ]
    if plan:
        storage.pipe_atomic(fs, f"{retry}/{_PLAN}", json.dumps(plan, indent=1).encode())
    return dropped


def check_rows_match(
    output: str, snapshot: Snapshot, path_column: str, storage_options: Mapping[str, Any]
) -> None:
    """Refuse (one line) when a committed output row's path is not the path of the snapshot
    row with its ``memscore_row``: the check that stands in for a lost state's identity.

    File by file, with the snapshot's parts read as they are needed (a few cached): the
    driver holds a few files' ids and paths, not the output."""
    import numpy as np

    sink = open_sink(output, storage_options)
    snap_fs, _ = (
        storage.url_to_fs(snapshot.files[0], storage_options) if snapshot.files else (sink.fs, None)
    )
    snap_filesystem = storage.pyarrow_filesystem_of(snap_fs)
    parts = [p.split("://", 1)[1] if storage.is_url(p) else p for p in snapshot.files]
    starts = np.cumsum(
        [0] + [pq.ParquetFile(p, filesystem=snap_filesystem).metadata.num_rows for p in parts]
    )
    cache: dict[int, Any] = {}

    def paths_of(part: int):
        if part not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[part] = pq.read_table(
                parts[part], columns=[path_column], filesystem=snap_filesystem
            ).column(path_column)
        return cache[part]

    for path in sink.files():
        table = sink.read_file(path, [ROW_COLUMN, path_column])
        ids = table.column(ROW_COLUMN).to_numpy()
        got = table.column(path_column).to_pylist()
        for row, value in zip(ids.tolist(), got):
            part = int(np.searchsorted(starts, row, side="right") - 1)
            if row < 0 or part >= len(parts):
                raise MemscoreError(
                    f"{output}: its row {row} is not a row of the manifest as it is now; "
                    f"the run cannot be finished: score again with --overwrite"
                )
            expected = paths_of(part)[row - int(starts[part])].as_py()
            if expected != value:
                raise MemscoreError(
                    f"{output}: its row {row} is {value!r}, but the manifest's row {row} is "
                    f"{expected!r}: the output was made from another manifest; score again "
                    f"with --overwrite"
                )


def apply_retry_plan(output: str, storage_options: Mapping[str, Any]) -> bool:
    """Finish a ``drop_error_rows`` replacement, if one is pending; idempotent. -> whether one
    was."""
    fs, retry = storage.url_to_fs(_work(output, _RETRY_DIR), storage_options)
    plan_file = f"{retry}/{_PLAN}"
    if not fs.exists(plan_file):
        if fs.exists(retry):
            fs.rm(retry, recursive=True)  # new files of a plan never written
        return False
    for step in json.loads(fs.cat_file(plan_file)):
        if "delete" in step:
            if fs.exists(step["delete"]):
                fs.rm_file(step["delete"])
        elif fs.exists(step["move"]):  # else moved before a kill
            if not storage.is_url(output):
                import os

                os.replace(step["move"], step["to"])  # atomic on one local filesystem
            else:
                fs.copy(step["move"], step["to"])
                fs.rm_file(step["move"])
    fs.rm(retry, recursive=True)  # the plan last: until then a kill replays it
    return True


def _write_ids(fs, path: str, table: pa.Table) -> None:
    """A checkpoint id file, in Ray's checkpoint format (Parquet, whatever the output's)."""
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
