"""The run folder of a training job (``memscore finetune``, ``memscore train-sae``): fresh,
resumed or complete, and never two different runs mixed in one folder.

A run folder holds ``state.json`` (the run's identity: the options and the manifest's
fingerprint, written when the run starts) beside what the job writes. ``--overwrite`` deletes a
folder only when it holds that file: a folder memscore did not make is never deleted.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

from memscore import storage
from memscore.errors import MemscoreError

__all__ = ["STATE_FILE", "prepare_run_folder", "read_json", "json_default"]

STATE_FILE = "state.json"


def prepare_run_folder(run_dir: str, identity: Mapping[str, Any], *, job: str,
                       summary_file: str, is_complete: Callable[[dict], bool],
                       overwrite: bool = False,
                       storage_options: Mapping[str, Any] | None = None) -> str:
    """"fresh", "resume" or "complete" for the run folder ``run_dir``.

    Args:
        run_dir: the folder (local or URL).
        identity: what the run is; a folder holding a run of another identity is refused.
        job: the command's name, for messages ("finetune").
        summary_file: the file the job writes when it ends; with it, ``is_complete(summary)``
            says whether the run needs nothing more.
        is_complete: reads the summary (a dict).
        overwrite: delete a run folder of memscore's first (a folder without ``state.json``
            is refused, not deleted).
        storage_options: fsspec options.

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
    fs, path = storage.url_to_fs(run_dir, dict(storage_options or {}))
    state_path = f"{path}/{STATE_FILE}"
    ours = fs.exists(state_path)
    if overwrite and ours:
        fs.rm(path, recursive=True)
        ours = False
    if ours:
        saved = json.loads(fs.cat_file(state_path))
        changed = [k for k in identity if saved.get(k) != identity[k]]
        if changed:
            raise MemscoreError(
                f"{run_dir} holds a run with other settings ({', '.join(changed)} differ); "
                f"choose another --name or pass --overwrite")
        if fs.exists(f"{path}/{summary_file}"):
            if is_complete(json.loads(fs.cat_file(f"{path}/{summary_file}"))):
                return "complete"
        return "resume"
    if fs.exists(path) and fs.ls(path):
        raise MemscoreError(f"{run_dir} exists and is not a memscore {job} run (no "
                            f"{STATE_FILE}); choose another --name"
                            + ("" if overwrite else " or pass --overwrite if it is one"))
    if not storage.is_url(run_dir):
        fs.makedirs(path, exist_ok=True)
    storage.pipe_atomic(fs, state_path, (json.dumps(identity, indent=2) + "\n").encode())
    return "fresh"


def json_default(value: Any):
    """``json.dumps``'s ``default`` for a job's summaries: a NaN or infinite metric is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def read_json(path: str, storage_options: Mapping[str, Any] | None) -> Any:
    """The JSON file at ``path`` (local or URL), or None when there is none."""
    fs, inner = storage.url_to_fs(path, dict(storage_options or {}))
    return json.loads(fs.cat_file(inner)) if fs.exists(inner) else None
