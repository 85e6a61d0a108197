"""The three vision encoders of the memorability-traces paper, through Hugging Face transformers.

Takmaz et al., "Traces of Image Memorability in Vision Encoders" (ICCV 2025 workshop; code
``ecekt/image_memorability_memvis``) read memorability out of three pretrained vision
transformers: CLIP ViT-B/32's vision tower, DINOv2-base and SigLIP2 base/16-224. This module is
memscore's one way in to them:

* where an encoder's folder is: a Hugging Face model id, found in the local Hugging Face cache
  only (memscore downloads nothing), or a folder written by ``save_pretrained`` (the model and
  its image processor), local or ``s3://`` (``locate_folder``, ``local_folder``);
* its preprocessing, ``HFImagePreprocess``: the folder's own Pillow-based transformers image
  processor, reproduced in memscore's two halves (uint8 resize and crop in the CPU decode stage,
  rescale and normalise on the model actor), pixel for pixel;
* ``load_encoder``: the model in eval mode with eager attention (the attention maps exist);
* ``representation``: what the paper's autoencoder reads.

Nothing here imports torch or transformers when the module is imported: the job's driver and
the CPU decode tasks use the folder and preprocessing parts only (see ``memscore.models.transforms``
for why decode workers must not import torch).

Example:
    >>> from memscore.models.encoders import ENCODERS, load_encoder
    >>> ENCODERS["dinov2"]
    'facebook/dinov2-base'
    >>> model, preprocess = load_encoder("dinov2", "/data/dinov2-base")  # doctest: +SKIP
    >>> preprocess.array_shape  # doctest: +SKIP
    (224, 224, 3)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memscore.models._api import WeightsNotFoundError

__all__ = [
    "ENCODERS",
    "ARCHITECTURES",
    "Architecture",
    "HFImagePreprocess",
    "locate_folder",
    "local_folder",
    "read_folder_json",
    "check_folder",
    "preprocess_of",
    "folder_digest",
    "load_encoder",
    "random_encoder",
    "representation",
    "is_hf_model_id",
]

#: Encoder name -> the Hugging Face model id the paper used (the default weights).
ENCODERS = {
    "clip": "openai/clip-vit-base-patch32",
    "dinov2": "facebook/dinov2-base",
    "siglip2": "google/siglip2-base-patch16-224",
}


@dataclass(frozen=True)
class Architecture:
    """How the paper loads one encoder.

    Args:
        model_class: the transformers class (``CLIPVisionModel``: the vision tower of a full
            CLIP checkpoint; ``SiglipVisionModel``: the paper's SigLIP2 checkpoint is a plain
            SigLIP one, which ``Siglip2VisionModel`` does not load).
        model_types: ``config.json`` ``model_type`` values that class loads (a full model's,
            whose text tower is left out, or the vision model's own).
        has_cls: whether token 0 is a CLS token. SigLIP has none; the paper treats its token 0
            as "CLS" and tokens 1.. as patches, and so does memscore.
    """

    model_class: str
    model_types: tuple[str, ...]
    has_cls: bool


ARCHITECTURES = {
    "clip": Architecture("CLIPVisionModel", ("clip", "clip_vision_model"), has_cls=True),
    "dinov2": Architecture("Dinov2Model", ("dinov2",), has_cls=True),
    "siglip2": Architecture("SiglipVisionModel", ("siglip", "siglip_vision_model"), has_cls=False),
}

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# What save_pretrained writes for the tensors: one file, or shards with an index.
_WEIGHT_FILES = re.compile(
    r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$"
    r"|^(model\.safetensors|pytorch_model\.bin)\.index\.json$"
)
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt", ".json")


def _check_encoder(encoder: str) -> Architecture:
    try:
        return ARCHITECTURES[encoder]
    except KeyError:
        raise ValueError(
            f"unknown encoder {encoder!r}; choose from {', '.join(ARCHITECTURES)}"
        ) from None


def is_hf_model_id(weights: str) -> bool:
    """Whether ``weights`` reads as a Hugging Face model id (``owner/name``) rather than a path:
    one slash, no URL scheme, no leading ``.``, ``/`` or ``~``, no file suffix. A local folder
    of that relative name, where one exists, is still taken as the folder (``locate_folder``)."""
    return bool(_HF_ID.match(weights)) and not weights.lower().endswith(_CHECKPOINT_SUFFIXES)


# ------------------------------------------------------------------------------ where it is
def _hf_cache_folder(model_id: str) -> str:
    """The snapshot folder of ``model_id`` in the local Hugging Face cache; never downloads."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
        from huggingface_hub.constants import HF_HUB_CACHE

        raise WeightsNotFoundError(
            f"the Hugging Face model {model_id} is not in the local Hugging Face cache "
            f"({HF_HUB_CACHE}) and memscore downloads nothing ({type(exc).__name__}): "
            f"run `hf download {model_id}` on a machine with internet and copy the cache here "
            f"(HF_HOME or HF_HUB_CACHE name it), or give --weights a folder written by "
            f"save_pretrained (the model and its image processor), local or s3://"
        ) from None


def locate_folder(encoder: str, weights: str | None = None) -> str:
    """Where ``encoder``'s folder is: a local absolute path, or a URL (``s3://...``).

    Args:
        encoder: ``clip``, ``dinov2`` or ``siglip2``.
        weights: None (the paper's model, ``ENCODERS[encoder]``, from the Hugging Face cache),
            a Hugging Face model id (from the cache), or a folder written by ``save_pretrained``,
            local or a URL.

    Raises:
        WeightsNotFoundError: a model id that is not in the local cache, a local folder that
            does not exist; the message says what to do.
    """
    _check_encoder(encoder)
    weights = ENCODERS[encoder] if weights is None else str(weights)
    if "://" in weights:
        if weights.startswith("file://"):
            weights = weights[len("file://") :]
        else:
            return weights.rstrip("/")
    local = os.path.abspath(os.path.expanduser(weights))
    if os.path.isdir(local):
        return local
    if is_hf_model_id(weights):
        return _hf_cache_folder(weights)
    raise WeightsNotFoundError(
        f"--weights {weights}: no such folder (give a folder written by save_pretrained, "
        f"local or s3://, or a Hugging Face model id in the local cache, e.g. {ENCODERS[encoder]})"
    )


def _fs(folder: str, storage_options: Mapping[str, Any] | None):
    from memscore import storage

    return storage.url_to_fs(folder, storage_options)


def read_folder_json(
    folder: str, name: str, storage_options: Mapping[str, Any] | None = None
) -> dict | None:
    """``folder/name`` parsed as JSON (local or URL); None when the file is not there."""
    fs, path = _fs(folder, storage_options)
    target = f"{path.rstrip('/')}/{name}"
    try:
        data = fs.cat_file(target)
    except FileNotFoundError:
        return None
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{folder}/{name} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{folder}/{name} holds a {type(value).__name__}, not a JSON object")
    return value


_HOW_TO_WRITE = (
    "write it with model.save_pretrained(folder) and "
    "AutoImageProcessor.from_pretrained(..., backend='pil').save_pretrained(folder)"
)


def check_folder(
    encoder: str, folder: str, storage_options: Mapping[str, Any] | None = None
) -> dict:
    """Check that ``folder`` is a model folder of ``encoder`` and return its ``config.json``.

    Reads only the folder's listing and ``config.json`` (a few KB, also from S3), so a job's
    driver can refuse a bad ``--weights`` in a second, before any cluster work.

    Raises:
        ValueError: one line naming what is missing or wrong.
    """
    architecture = _check_encoder(encoder)
    fs, path = _fs(folder, storage_options)
    try:
        names = {os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"--weights {folder}: no such folder") from None
    missing = [name for name in (CONFIG_FILE, PREPROCESSOR_FILE) if name not in names]
    if not any(_WEIGHT_FILES.match(name) for name in names):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if missing:
        raise ValueError(
            f"--weights {folder} is not a Hugging Face model folder: no "
            f"{' and no '.join(missing)} ({_HOW_TO_WRITE})"
        )
    config = read_folder_json(folder, CONFIG_FILE, storage_options)
    model_type = config.get("model_type")
    if model_type not in architecture.model_types:
        raise ValueError(
            f"--weights {folder} holds a {model_type!r} model, not {encoder} "
            f"({architecture.model_class} loads model_type {' or '.join(architecture.model_types)})"
        )
    return config


def _cache_root() -> Path:
    root = os.environ.get("MEMSCORE_CACHE") or Path.home() / ".cache" / "memscore"
    return Path(root) / "hf-folders"


def local_folder(folder: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """``folder`` on this machine: a local folder as it is, a URL's files downloaded once.

    A URL's folder goes to ``$MEMSCORE_CACHE/hf-folders/<hash>`` (default ``~/.cache/memscore``),
    the hash taken over the URL and each file's name, size and ETag or modification time, so a
    folder changed in place is downloaded again. The download goes to a folder of its own and is
    renamed into place, so model actors starting together on one node never read a half-written
    copy (one of them wins the rename; the others' copies are removed).
    """
    if "://" not in folder or folder.startswith("file://"):
        return folder[len("file://") :] if folder.startswith("file://") else folder
    fs, path = _fs(folder, storage_options)
    try:
        listing = sorted(fs.find(path, detail=True).items())
    except FileNotFoundError:
        listing = []
    if not listing:
        raise ValueError(f"--weights {folder}: no such folder, or an empty one")
    stamp = [
        (
            name,
            info.get("size"),
            info.get("ETag") or info.get("mtime") or str(info.get("LastModified")),
        )
        for name, info in listing
    ]
    key = hashlib.sha256(repr((folder, stamp)).encode()).hexdigest()[:32]
    target = _cache_root() / key
    if target.is_dir():
        return str(target)
    partial = target.with_name(f"{key}.{uuid.uuid4().hex}.partial")
    partial.mkdir(parents=True)
    try:
        for name, _ in listing:
            relative = name[len(path.rstrip("/")) + 1 :]
            (partial / relative).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(partial / relative))
        try:
            os.rename(partial, target)
        except OSError:  # another actor's copy got there first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def folder_digest(folder: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """sha256 over the files that decide an encoder's output: its tensors, ``config.json`` and
    ``preprocessor_config.json`` (each file's sha256 with its name, sorted by name).

    Each file's hash is cached by ``file_sha256`` under its size and modification stamp, so a
    run after the first pays only for listing the folder.
    """
    from memscore.models._api import file_sha256

    fs, path = _fs(folder, storage_options)
    names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    chosen = [n for n in names if _WEIGHT_FILES.match(n) or n in (CONFIG_FILE, PREPROCESSOR_FILE)]
    digest = hashlib.sha256()
    for name in chosen:
        full = f"{folder.rstrip('/')}/{name}"
        # the HF cache's files are symlinks into its blobs: hash what they point at
        if "://" not in full:
            full = os.path.realpath(full)
        digest.update(f"{name}\0{file_sha256(full, storage_options=storage_options)}\0".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- preprocessing
# The image processor families memscore reproduces, with transformers' class defaults (the
# values a preprocessor_config.json may leave out), as in transformers 5's
# image_processing_pil_{clip,bit,siglip}.py. Each runs transformers' generic Pillow pipeline
# (resize, centre crop, rescale, normalise), which HFImagePreprocess reproduces.
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3
_PROCESSOR_DEFAULTS = {
    "CLIPImageProcessor": {
        "resample": _BICUBIC,
        "size": {"shortest_edge": 224},
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "image_mean": _OPENAI_CLIP_MEAN,
        "image_std": _OPENAI_CLIP_STD,
    },
    "BitImageProcessor": {
        "resample": _BICUBIC,
        "size": {"shortest_edge": 224},
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "image_mean": _OPENAI_CLIP_MEAN,
        "image_std": _OPENAI_CLIP_STD,
    },
    "SiglipImageProcessor": {
        "resample": _BICUBIC,
        "size": {"height": 224, "width": 224},
        "crop_size": None,
        "do_center_crop": False,
        "image_mean": (0.5, 0.5, 0.5),
        "image_std": (0.5, 0.5, 0.5),
    },
}
_PROCESSOR_ALIASES = {"CLIPFeatureExtractor": "CLIPImageProcessor"}  # openai/clip-* folders


def _size_dict(value: Any, default_to_square: bool, what: str) -> dict:
    """transformers' ``get_size_dict`` for the forms a saved config holds."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    raise ValueError(f"{what} {value!r} is not a size memscore reads")


@dataclass(frozen=True)
class HFImagePreprocess:
    """A transformers image processor's Pillow pipeline, in memscore's two halves.

    ``to_array`` (CPU decode stage, no torch): resize with Pillow as transformers' Pillow backend
    does (``shortest_edge``: the short side to that size and the long side to
    ``int(size * long / short)``; or a fixed ``height`` x ``width``), with the processor's
    resample filter, then the centre crop transformers takes (offsets rounded down; zero padding
    where the image is smaller than the crop) -> uint8 HWC. ``to_tensor`` (model actor): the
    rescale as transformers computes it (``uint8 * factor`` in float64, then float32) and the
    normalisation in float32, ``(x - mean) / std``. ``to_tensor(to_array(image))`` equals
    ``AutoImageProcessor.from_pretrained(folder, backend="pil")(image)`` exactly
    (``tests/test_encoders.py``); the torchvision-based ("fast") processors give other pixels.

    Args:
        processor: the family, e.g. ``CLIPImageProcessor`` (informational).
        shortest_edge: resize the short side to this (and keep the aspect ratio), or None.
        height_width: resize to exactly this (height, width), when ``shortest_edge`` is None.
        resample: Pillow filter number (``Image.Resampling``; 3 is bicubic).
        crop: (height, width) of the centre crop, or None for none.
        rescale_factor: multiply the uint8 values by this (None: no rescale).
        mean, std: per-channel normalisation (None: none).

    Example:
        >>> from PIL import Image
        >>> pre = HFImagePreprocess.from_config({"image_processor_type": "BitImageProcessor",
        ...                                      "size": {"shortest_edge": 256}})
        >>> pre.to_array(Image.new("RGB", (640, 480))).shape
        (224, 224, 3)
    """

    processor: str
    shortest_edge: int | None
    height_width: tuple[int, int] | None
    resample: int
    crop: tuple[int, int] | None
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], source: str = "preprocessor_config.json"
    ) -> HFImagePreprocess:
        """From a ``preprocessor_config.json``'s contents; ``ValueError`` naming ``source`` for
        a processor or setting memscore does not reproduce."""
        kind = config.get("image_processor_type") or config.get("feature_extractor_type") or ""
        family = _PROCESSOR_ALIASES.get(kind, re.sub(r"(Fast|Pil)$", "", kind))
        if family not in _PROCESSOR_DEFAULTS:
            raise ValueError(
                f"{source}: image processor {kind or '(unnamed)'!r} is not one "
                f"memscore reproduces ({', '.join(_PROCESSOR_DEFAULTS)})"
            )
        settings = {
            **_PROCESSOR_DEFAULTS[family],
            **{k: v for k, v in config.items() if v is not None},
        }
        for flag in ("do_pad",):
            if settings.get(flag):
                raise ValueError(f"{source}: {flag}=true is not reproduced by memscore")
        if not settings.get("do_resize", True):
            raise ValueError(
                f"{source}: do_resize=false gives inputs of every size; memscore "
                f"needs a fixed input size"
            )
        size = _size_dict(settings["size"], default_to_square=False, what=f"{source}: size")
        shortest = height_width = None
        if set(size) == {"shortest_edge"}:
            shortest = int(size["shortest_edge"])
        elif set(size) == {"height", "width"}:
            height_width = (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(
                f"{source}: size {size} is not one memscore reproduces "
                f"(shortest_edge, or height and width)"
            )
        crop = None
        if settings.get("do_center_crop"):
            crop_size = _size_dict(
                settings.get("crop_size"), default_to_square=True, what=f"{source}: crop_size"
            )
            if set(crop_size) != {"height", "width"}:
                raise ValueError(f"{source}: crop_size {crop_size} needs height and width")
            crop = (int(crop_size["height"]), int(crop_size["width"]))
        if shortest is not None and crop is None:
            raise ValueError(
                f"{source}: a shortest_edge resize without a centre crop gives "
                f"inputs of every size; memscore needs a fixed input size"
            )
        rescale = (
            float(settings.get("rescale_factor", 1 / 255))
            if settings.get("do_rescale", True)
            else None
        )
        mean = std = None
        if settings.get("do_normalize", True):
            mean, std = (
                tuple(_three(settings[k], f"{source}: {k}")) for k in ("image_mean", "image_std")
            )
        return cls(
            processor=family,
            shortest_edge=shortest,
            height_width=height_width,
            resample=int(settings.get("resample", _BICUBIC)),
            crop=crop,
            rescale_factor=rescale,
            mean=mean,
            std=std,
        )

    @property
    def array_shape(self) -> tuple[int, int, int]:
        """Shape of what ``to_array`` returns: (height, width, 3) of the crop, or of the resize."""
        height, width = self.crop or self.height_width
        return (height, width, 3)

    @property
    def resize(self) -> tuple[int, int]:
        """The resize's (height, width) as far as it is known before the image: the side the
        decode stage's ``fast_decode`` keeps twice of (``DecodeImages``)."""
        if self.shortest_edge is not None:
            return (self.shortest_edge, self.shortest_edge)
        return self.height_width

    def resize_to(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) transformers resizes a ``width`` x ``height`` image to."""
        if self.shortest_edge is None:
            return self.height_width
        # transformers' get_resize_output_image_size(default_to_square=False), float and int as it
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def to_array(self, image) -> np.ndarray:
        """PIL image in mode RGB -> uint8 array of shape ``array_shape``."""
        if image.mode != "RGB":
            raise ValueError(f"to_array expects an RGB image, got mode {image.mode}")
        height, width = self.resize_to(*image.size)
        array = np.asarray(image.resize((width, height), resample=self.resample), dtype=np.uint8)
        if self.crop is not None:
            array = _center_crop(array, self.crop)
        return np.ascontiguousarray(array)

    def to_tensor(self, arrays: np.ndarray, memory_format=None):
        """uint8 array (N, H, W, 3) -> float32 tensor (N, 3, H, W), rescaled and normalised as
        transformers does it; ``memory_format`` as in ``ImagePreprocess.to_tensor``."""
        import torch

        arrays = np.ascontiguousarray(arrays)
        if not arrays.flags.writeable:  # a zero-copy view of an Arrow buffer
            arrays = arrays.copy()
        batch = torch.from_numpy(arrays).permute(0, 3, 1, 2)
        if self.rescale_factor is not None:
            # transformers: image.astype(float64) * scale, then astype(float32)
            batch = batch.to(torch.float64).mul(self.rescale_factor).to(torch.float32)
        else:
            batch = batch.to(torch.float32)
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
            batch = (batch - mean) / std
        return batch.contiguous(memory_format=memory_format or torch.contiguous_format)

    def __call__(self, image):
        """PIL image (RGB) -> float tensor (3, H, W): the whole pipeline for one image."""
        return self.to_tensor(self.to_array(image)[None])[0]


def _three(value: Any, what: str) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{what} needs 3 values (RGB), got {len(values)}")
    return values


def _center_crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers' ``center_crop`` on an HWC array: offsets ``(side - crop) // 2``; an image
    smaller than the crop is first padded with zeros, ``ceil`` of the difference before it."""
    crop_h, crop_w = size
    height, width = array.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= height and left + crop_w <= width:
        return array[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w, array.shape[2]), dtype=array.dtype)
    top_pad, left_pad = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = array
    top, left = max(top + top_pad, 0), max(left + left_pad, 0)
    return padded[top : top + crop_h, left : left + crop_w]


def preprocess_of(
    encoder: str, weights: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> HFImagePreprocess:
    """The preprocessing of ``encoder`` with ``weights`` (as ``locate_folder`` takes them), read
    from the folder's ``preprocessor_config.json`` without loading the model (or torch)."""
    folder = locate_folder(encoder, weights)
    config = read_folder_json(folder, PREPROCESSOR_FILE, storage_options)
    if config is None:
        raise ValueError(f"--weights {folder} has no {PREPROCESSOR_FILE} ({_HOW_TO_WRITE})")
    return HFImagePreprocess.from_config(config, source=f"{folder}/{PREPROCESSOR_FILE}")


# ------------------------------------------------------------------------------- the model
def load_encoder(
    encoder: str, weights: str | None = None, storage_options: Mapping[str, Any] | None = None
):
    """``encoder``'s model, in eval mode with eager attention, and its preprocessing.

    Args:
        encoder: ``clip`` (``CLIPVisionModel``), ``dinov2`` (``Dinov2Model``) or ``siglip2``
            (``SiglipVisionModel``, as the paper loads SigLIP2).
        weights: None for the paper's model (``ENCODERS[encoder]``), a Hugging Face model id
            (both from the local Hugging Face cache; nothing is downloaded), or a folder written
            by ``save_pretrained`` with its ``preprocessor_config.json``, local or ``s3://``
            (downloaded once into memscore's cache, see ``local_folder``).
        storage_options: fsspec options for an ``s3://`` folder.

    Returns:
        ``(model, preprocess)``: the transformers model (eval mode, float32, on the CPU) and its
        ``HFImagePreprocess``.

    Raises:
        WeightsNotFoundError: the model id is not in the local cache, or the folder is missing.
        ValueError: the folder is not a complete model of ``encoder`` (one line naming what).

    Example:
        >>> model, preprocess = load_encoder("clip")  # doctest: +SKIP
        >>> from PIL import Image
        >>> x = preprocess.to_tensor(preprocess.to_array(Image.open("a.jpg").convert("RGB"))[None])  # doctest: +SKIP
        >>> representation("clip", model, x).shape  # doctest: +SKIP
        torch.Size([1, 768])
    """
    architecture = _check_encoder(encoder)
    folder = locate_folder(encoder, weights)
    check_folder(encoder, folder, storage_options)
    preprocess = preprocess_of(encoder, folder, storage_options)
    path = local_folder(folder, storage_options)

    import transformers

    model_class = getattr(transformers, architecture.model_class)
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    # No load report of the text tower left out, no progress bar per model actor: the
    # loading info below is checked instead.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(
            path, attn_implementation="eager", local_files_only=True, output_loading_info=True
        )
    except Exception as exc:  # OSError, ValueError, safetensors' own error for a bad file...
        from memscore.errors import first_line

        raise ValueError(
            f"--weights {folder}: transformers could not load a "
            f"{architecture.model_class}: {first_line(exc)}"
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    problems = [
        f"{kind.replace('_', ' ')}: {', '.join(sorted(map(str, keys))[:5])}"
        for kind, keys in info.items()
        if kind in ("missing_keys", "mismatched_keys") and keys
    ]
    if problems:  # a tensor left at its random initialisation must never score
        raise ValueError(
            f"--weights {folder} is not a complete {architecture.model_class}: "
            + "; ".join(problems)
        )
    return model.eval(), preprocess


def random_encoder(encoder: str):
    """``encoder``'s Base-size architecture, randomly initialised (eval mode, eager attention).

    The architectures of the paper's folders, built from transformers' configs, whose defaults
    are those models' (CLIP ViT-B/32; SigLIP base/16-224; DINOv2-base, whose config also says
    ``image_size=518``: its position embeddings are interpolated to a 224-pixel input as the
    real model's are). For measuring speed and for tests; no weights are read.
    """
    _check_encoder(encoder)
    import transformers

    config = {
        "clip": lambda: transformers.CLIPVisionConfig(),
        "dinov2": lambda: transformers.Dinov2Config(image_size=518),
        "siglip2": lambda: transformers.SiglipVisionConfig(),
    }[encoder]()
    model_class = getattr(transformers, ARCHITECTURES[encoder].model_class)
    return model_class._from_config(config, attn_implementation="eager").eval()


def representation(encoder: str, model, pixel_values):
    """The vector the paper's autoencoder reads, ``[N, d]``.

    CLIP and DINOv2: the last hidden state's token 0 (CLS), before the post-layernorm (the
    paper's ``hidden_states[-1][:, 0]``). SigLIP2: the pooled image features, which the paper
    takes from ``SiglipModel.get_image_features`` and which are the vision model's
    ``pooler_output`` (SigLIP's attention-pooling head; there is no projection).

    Args:
        encoder: ``clip``, ``dinov2`` or ``siglip2``.
        model: from ``load_encoder(encoder, ...)``.
        pixel_values: float ``[N, 3, H, W]`` from the encoder's ``preprocess.to_tensor``.
    """
    _check_encoder(encoder)
    if encoder == "siglip2":
        return model(pixel_values=pixel_values).pooler_output
    outputs = model(pixel_values=pixel_values, output_hidden_states=True)
    return outputs.hidden_states[-1][:, 0]
