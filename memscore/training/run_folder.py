"""The run folder of a training job (``memscore finetune``, ``memscore train-sae``): fresh,
resumed or complete, and never two different runs mixed in one folder.

A run folder holds ``state.json`` (the run's identity: the options and the manifest's
fingerprint, written once the run's checks have passed) beside what the job writes.
``--overwrite`` deletes a folder only when it holds that file: a folder memscore did not make is
never deleted. A run refused before it trains leaves nothing behind: ``check_run_folder``
writes nothing, ``start_run_folder`` claims the folder, and ``abandon_run_folder`` removes what a
fresh run wrote before it was refused, so the corrected command starts afresh.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from memscore import storage
from memscore.errors import MemscoreError

__all__ = [
    "STATE_FILE",
    "NOTHING_TO_DO",
    "check_run_folder",
    "start_run_folder",
    "abandon_run_folder",
    "prepare_run_folder",
    "read_json",
    "json_default",
]

STATE_FILE = "state.json"
#: What the final line of a command says when its run was already complete (its summary's
#: ``work_done`` is False): scoring, fine-tuning and train-sae alike.
NOTHING_TO_DO = "already complete: nothing to do"


def check_run_folder(
    run_dir: str,
    identity: Mapping[str, Any],
    *,
    job: str,
    summary_file: str,
    is_complete: Callable[[dict], bool],
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """ "fresh", "resume" or "complete" for the run folder ``run_dir``; writes nothing.

    Args:
        run_dir: the folder (local or URL).
        identity: what the run is; a folder holding a run of another identity is refused.
        job: the command's name, for messages ("finetune").
        summary_file: the file the job writes when it ends; with it, ``is_complete(summary)``
            says whether the run needs nothing more.
        is_complete: reads the summary (a dict).
        overwrite: a run folder of memscore's is "fresh" (``start_run_folder`` deletes it);
            a folder without ``state.json`` is refused all the same.
        storage_options: fsspec options.

    Raises:
        MemscoreError: the folder holds a run with other settings, or is not a memscore run.
    """
    fs, path = storage.url_to_fs(run_dir, dict(storage_options or {}))
    state_path = f"{path}/{STATE_FILE}"
    ours = fs.exists(state_path)
    if ours and not overwrite:
        saved = json.loads(fs.cat_file(state_path))
        changed = [k for k in identity if saved.get(k) != identity[k]]
        if changed:
            raise MemscoreError(
                f"{run_dir} holds a run with other settings ({', '.join(changed)} differ); "
                f"choose another --name or pass --overwrite"
            )
        if fs.exists(f"{path}/{summary_file}"):
            if is_complete(json.loads(fs.cat_file(f"{path}/{summary_file}"))):
                return "complete"
        return "resume"
    if not ours and fs.exists(path) and fs.ls(path):
        raise MemscoreError(
            f"{run_dir} exists and is not a memscore {job} run (no "
            f"{STATE_FILE}); choose another --name"
            + ("" if overwrite else " or pass --overwrite if it is one")
        )
    return "fresh"


def start_run_folder(
    run_dir: str,
    identity: Mapping[str, Any],
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Claim ``run_dir`` for a fresh run (``check_run_folder`` said "fresh"): with
    ``overwrite``, the run of memscore's that is there is deleted first; then ``state.json``."""
    fs, path = storage.url_to_fs(run_dir, dict(storage_options or {}))
    state_path = f"{path}/{STATE_FILE}"
    if overwrite and fs.exists(state_path):
        fs.rm(path, recursive=True)
    if not storage.is_url(run_dir):
        fs.makedirs(path, exist_ok=True)
    storage.pipe_atomic(fs, state_path, (json.dumps(identity, indent=2) + "\n").encode())


def abandon_run_folder(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove what a fresh run wrote into ``run_dir`` (``start_run_folder`` on an empty or
    absent folder, so all of it is the run's) when a check refuses the run before it trains:
    its ``state.json`` would make the corrected command "a run with other settings"."""
    fs, path = storage.url_to_fs(run_dir, dict(storage_options or {}))
    if fs.exists(f"{path}/{STATE_FILE}"):
        fs.rm(path, recursive=True)


def prepare_run_folder(
    run_dir: str,
    identity: Mapping[str, Any],
    *,
    job: str,
    summary_file: str,
    is_complete: Callable[[dict], bool],
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """``check_run_folder``, then ``start_run_folder`` where the run is fresh: for a job whose
    checks have all passed.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp() + "/run"
        >>> prepare_run_folder(folder, {"lr": 1e-4}, job="finetune", summary_file="x.json",
        ...                    is_complete=lambda summary: True)
        'fresh'
        >>> prepare_run_folder(folder, {"lr": 1e-4}, job="finetune", summary_file="x.json",
        ...                    is_complete=lambda summary: True)
        'resume'
    """
    status = check_run_folder(
        run_dir,
        identity,
        job=job,
        summary_file=summary_file,
        is_complete=is_complete,
        overwrite=overwrite,
        storage_options=storage_options,
    )
    if status == "fresh":
        start_run_folder(run_dir, identity, overwrite=overwrite, storage_options=storage_options)
    return status


def json_default(value: Any):
    """``json.dumps``'s ``default`` for a job's summaries: a NaN or infinite metric is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def read_json(path: str, storage_options: Mapping[str, Any] | None) -> Any:
    """The JSON file at ``path`` (local or URL), or None when there is none."""
    fs, inner = storage.url_to_fs(path, dict(storage_options or {}))
    return json.loads(fs.cat_file(inner)) if fs.exists(inner) else None
