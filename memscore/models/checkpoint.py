"""memscore checkpoints: a folder with the model's tensors and a JSON that says what they are.

``memscore finetune`` writes one, ``memscore score --weights FOLDER`` and
``memscore.get_model(name, weights=FOLDER)`` read it::

    best/
      model.safetensors   the state_dict (safetensors: tensors only, nothing to unpickle)
      memscore.json       model name, weights member (its preprocessing and output column),
                          training config, metrics, the manifest's hash, versions

The JSON is written last, so a folder without it is an interrupted write, not a checkpoint.
A plain state_dict file (``.safetensors``, or a torch file read with ``weights_only=True``)
still works as ``--weights``; it is scored with the model's DEFAULT preprocessing.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from memscore import storage

__all__ = [
    "FORMAT",
    "MODEL_FILE",
    "INFO_FILE",
    "save_checkpoint",
    "read_checkpoint_info",
    "state_dict_file",
]

FORMAT = "memscore-checkpoint/1"
MODEL_FILE = "model.safetensors"
INFO_FILE = "memscore.json"


def save_checkpoint(
    folder: str,
    state_dict: Mapping[str, Any],
    info: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None = None,
    *,
    extra_files: Mapping[str, bytes] | None = None,
) -> str:
    """Write ``state_dict`` and ``info`` (must name ``model`` and ``weights``) into ``folder``.

    ``extra_files`` (name -> bytes) go beside them, before the JSON. An existing checkpoint
    there is replaced: its JSON goes first, so a crash mid-write leaves a folder that
    ``read_checkpoint_info`` does not take for a checkpoint.
    """
    from safetensors.torch import save

    for key in ("model", "weights"):
        if key not in info:
            raise ValueError(f"checkpoint info needs {key!r}")
    fs, path = storage.url_to_fs(folder, storage_options)
    info_path, model_path = f"{path.rstrip('/')}/{INFO_FILE}", f"{path.rstrip('/')}/{MODEL_FILE}"
    if fs.exists(info_path):
        fs.rm_file(info_path)
    if not storage.is_url(folder):
        fs.makedirs(path, exist_ok=True)
    # safetensors refuses tensors that share memory or are not contiguous; a state_dict may
    # hold views (tied or sliced parameters), so each tensor is saved as its own copy.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    storage.pipe_atomic(fs, model_path, save(tensors))
    for name, data in (extra_files or {}).items():
        storage.pipe_atomic(fs, f"{path.rstrip('/')}/{name}", data)
    record = {"format": FORMAT, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(), **info}
    storage.pipe_atomic(fs, info_path, (json.dumps(record, indent=2, default=str) + "\n").encode())
    return folder


def _folder_of(path: str, fs, inner: str) -> str | None:
    """The checkpoint folder ``path`` names: itself, or the folder of its ``model.safetensors``."""
    if fs.isdir(inner):
        return inner
    if inner.rsplit("/", 1)[-1] == MODEL_FILE:
        return inner.rsplit("/", 1)[0]
    return None


def read_checkpoint_info(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The JSON of the memscore checkpoint ``path`` names (folder or its model file), else None."""
    fs, inner = storage.url_to_fs(str(path), storage_options)
    folder = _folder_of(str(path), fs, inner)
    if folder is None:
        return None
    info_path = f"{folder.rstrip('/')}/{INFO_FILE}"
    if not fs.exists(info_path):
        return None
    info = json.loads(fs.cat_file(info_path))
    if info.get("format") != FORMAT:
        raise ValueError(
            f"{path}: {INFO_FILE} is not a {FORMAT} file (format {info.get('format')!r})"
        )
    return info


def state_dict_file(path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The tensor file of ``path``: the file itself, or a checkpoint folder's model file.

    Raises ``FileNotFoundError`` naming what is missing.
    """
    path = str(path)
    fs, inner = storage.url_to_fs(path, storage_options)
    if fs.isdir(inner):
        if not fs.exists(f"{inner.rstrip('/')}/{INFO_FILE}"):
            raise FileNotFoundError(
                f"{path} is a folder but not a memscore checkpoint (no {INFO_FILE}: an "
                f"interrupted write, or name the state_dict file itself)"
            )
        model = f"{inner.rstrip('/')}/{MODEL_FILE}"
        if not fs.isfile(model):
            raise FileNotFoundError(f"{path}: the checkpoint has no {MODEL_FILE}")
        return storage.join(path, MODEL_FILE)
    if not fs.isfile(inner):
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    return path
