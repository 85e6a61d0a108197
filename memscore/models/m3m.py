"""M3M (Needell & Bainbridge): ResMem plus a semantic-segmentation branch.

Three branches see the same (N, 3, 227, 227) RGB input in 0..1 (ResMem's input, *not*
normalised): ResMem's AlexNet-style branch (9216 features) and ResNet-152 (1000 logits), and a
frozen torchvision ``fcn_resnet50`` (21 Pascal VOC classes, trained on COCO) whose per-pixel class
probabilities are reduced by a small CNN (``seg_reducer``) to 1024 features. The three are
concatenated, in that order (9216 + 1000 + 1024 = 11240), and passed through ResMem's head.

The paper introduced M3M next to ResMem but published no M3M weights, nor the exact layers of
its segmentation branch; the segmentation network and the reducer here are memscore's own
reading of "ResMem plus a semantic-segmentation branch". Parameters come from a checkpoint you
train (``memscore finetune --model m3m``) and pass with ``--weights CHECKPOINT``; loading the
``DEFAULT`` member raises ``WeightsNotFoundError``. A checkpoint holds every tensor, the frozen
segmentation branch included, and is loaded strictly.

To start training, ``m3m_for_training()`` builds the model with the segmentation branch loaded
from torchvision's published ``fcn_resnet50_coco-1167a1af.pth`` (found in an explicit path,
``$MEMSCORE_FCN_WEIGHTS`` or the torch hub cache; memscore never downloads it) and, by default,
every ResMem tensor copied from the ``resmem`` package, so that the new model scores exactly as
ResMem does until training teaches it to use the segmentation features (see
``resmem_initial_state``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import resnet152
from torchvision.models.segmentation import FCN_ResNet50_Weights, fcn_resnet50

from memscore.models._api import (
    CheckpointKeyError,
    WeightsNotFoundError,
    build_from_checkpoint,
    build_with_weights,
    load_state_dict_file,
    load_state_dict_strict,
)
from memscore.models.registry import register_model
from memscore.models.resmem import (
    ResMem_Weights,
    alexnet_features,
    alexnet_layers,
    head,
    head_layers,
)
from memscore.models.weights import M3M_NO_WEIGHTS_MESSAGE as NO_WEIGHTS_MESSAGE, M3M_Weights

__all__ = [
    "FCN_ENV",
    "FCN_FILENAME",
    "FCN_URL",
    "M3M",
    "M3M_Weights",
    "NO_WEIGHTS_MESSAGE",
    "fcn_state_dict",
    "locate_fcn_weights",
    "m3m",
    "m3m_for_training",
    "resmem_initial_state",
]

NUM_CLASSES = 21  # Pascal VOC's 20 classes and background: the published FCN's label set
RESMEM_FEATURES = 9216 + 1000  # AlexNet-style branch + ResNet-152 logits, as in ResMem
SEG_FEATURES = 64 * 4 * 4  # what seg_reducer emits (see _seg_reducer)
# ImageNet statistics: fcn_resnet50's published weights expect them (its transforms normalise);
# plain constants rather than buffers, so checkpoints need not carry them and the meta-device
# build leaves nothing uninitialised.
FCN_MEAN = (0.485, 0.456, 0.406)
FCN_STD = (0.229, 0.224, 0.225)

_FCN_WEIGHTS = FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1
FCN_URL = _FCN_WEIGHTS.url
FCN_FILENAME = os.path.basename(urlparse(FCN_URL).path)  # fcn_resnet50_coco-1167a1af.pth
FCN_ENV = "MEMSCORE_FCN_WEIGHTS"
_AUX_PREFIX = "aux_classifier."  # the published file's auxiliary head, which M3M never runs


def _seg_reducer() -> nn.Sequential:
    # 21 x 227 x 227 class probabilities -> 1024 features. Two stride-2 convolutions (21 -> 32
    # -> 64 channels; 227 -> 114 -> 57) let the reducer learn local class co-occurrences at a
    # cost (~0.14 GMAC an image) that is small next to the two ResNets; the 4 x 4 average pool
    # keeps a coarse layout (what is in the centre, at the top, at the borders), which a global
    # pool would throw away. 64 * 16 = 1024 features is a tenth of ResMem's 10216, enough to
    # matter to the head without dominating fc6 (it adds 4.2M of fc6's 46M weights).
    return nn.Sequential(
        nn.Conv2d(NUM_CLASSES, 32, kernel_size=3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(1),
    )


def _fcn() -> nn.Module:
    # Without the auxiliary head: it only serves FCN's own training loss. Its keys in the
    # published file are dropped by name in fcn_state_dict, nothing else is.
    return fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False
    )


class M3M(nn.Module):
    """M3M: (N, 3, 227, 227) float RGB in 0..1 -> (N,) memorability in 0..1.

    ``segmentation`` is frozen: its parameters never require grad, it runs under ``no_grad``, and
    ``train()`` keeps it in eval mode, so neither its weights nor its BatchNorm statistics move
    while the rest of the model trains.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = resnet152(weights=None)
        alexnet_layers(self)
        self.segmentation = _fcn()
        self.segmentation.requires_grad_(False)
        self.seg_reducer = _seg_reducer()
        head_layers(self, in_features=RESMEM_FEATURES + SEG_FEATURES)
        self.segmentation.eval()

    def train(self, mode: bool = True) -> M3M:
        super().train(mode)
        self.segmentation.eval()  # frozen: BatchNorm uses, and keeps, its published statistics
        return self

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in 0..1 -> (N, 21, H, W) class probabilities of the frozen FCN."""
        mean = x.new_tensor(FCN_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(FCN_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            logits = self.segmentation((x - mean) / std)["out"]
        # Probabilities rather than logits: they lie in 0..1 and sum to one per pixel whatever
        # the image, so the reducer sees inputs on a fixed scale; they are the "which class is
        # here, how surely" map the paper feeds in, without argmax's loss of confidence.
        return logits.softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seg = self.seg_reducer(self.segment(x))
        return head(self, torch.cat((alexnet_features(self, x), self.features(x), seg), dim=1))


def locate_fcn_weights(path: str | Path | None = None) -> str:
    """Where the published ``fcn_resnet50`` COCO/VOC weights file is; never downloads it.

    Looks at ``path`` if given, else ``$MEMSCORE_FCN_WEIGHTS`` if set, else
    ``torch.hub.get_dir()/checkpoints/fcn_resnet50_coco-1167a1af.pth`` (where
    ``torchvision.models.segmentation.fcn_resnet50(weights="DEFAULT")`` caches it; ``$TORCH_HOME``
    moves it). A path that was asked for and is missing is an error, not a reason to look
    elsewhere. URLs (``s3://...``) are returned as they are.

    Raises:
        WeightsNotFoundError: naming the file, where to fetch it, and where it may go.
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints" / FCN_FILENAME
    how = (
        f"download {FCN_URL} on a machine with internet and put it at {hub} (the torch hub "
        f"cache) or anywhere named by ${FCN_ENV} or the segmentation_weights argument"
    )
    for given, what in (
        (path, "the segmentation weights path"),
        (os.environ.get(FCN_ENV) or None, f"${FCN_ENV}"),
    ):
        if given is None:
            continue
        given = str(given)
        if "://" in given or Path(given).is_file():
            return given
        raise WeightsNotFoundError(
            f"{what} {given} is not a file; M3M's segmentation branch needs {FCN_FILENAME}: {how}"
        )
    if hub.is_file():
        return str(hub)
    raise WeightsNotFoundError(
        f"M3M's segmentation branch needs torchvision's {FCN_FILENAME}, which is not on this "
        f"machine: {how}"
    )


def fcn_state_dict(
    path: str | Path, storage_options: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """The published FCN file's tensors, keyed as ``M3M.segmentation`` names them.

    The auxiliary head (``aux_classifier.*``, unused by M3M) is dropped; every other key must
    match, and a missing or extra one is a ``CheckpointKeyError`` naming it.
    """
    state = load_state_dict_file(path, storage_options)
    state = {k: v for k, v in state.items() if not k.startswith(_AUX_PREFIX)}
    with torch.device("meta"):
        template = _fcn()
    expected, given = set(template.state_dict()), set(state)
    if expected != given:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise CheckpointKeyError(
            f"{path} is not fcn_resnet50's state_dict: "
            + "; ".join(
                part
                for part in (
                    f"missing keys: {', '.join(missing[:8])}" if missing else "",
                    f"unexpected keys: {', '.join(extra[:8])}" if extra else "",
                )
                if part
            )
        )
    return state


def resmem_initial_state(resmem_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ResMem's state_dict as M3M's ResMem part: every tensor is copied as it is, except ``fc6``.

    That is ``conv1``-``conv5`` (the AlexNet-style branch), ``features.*`` (the retrained
    ResNet-152) and ``fc6.bias``, ``fc7``-``fc12`` (the head). ``fc6.weight`` is 4096 x 10216 in
    ResMem and 4096 x 11240 here: its first 10216 columns are ResMem's and the 1024 columns that
    read the segmentation features are zero. The new model then computes ResMem's score exactly
    (up to float summation order) whatever the segmentation branch says, and fine-tuning starts
    from ResMem rather than from a head that a random fc6 would have made meaningless; the zero
    columns get non-zero gradients from the first step, as in a zero-initialised residual branch.
    """
    fc6 = resmem_state["fc6.weight"]
    if tuple(fc6.shape) != (4096, RESMEM_FEATURES):
        raise CheckpointKeyError(
            f"ResMem's fc6.weight should be 4096 x {RESMEM_FEATURES}, got {tuple(fc6.shape)}"
        )
    state = dict(resmem_state)
    state["fc6.weight"] = torch.cat((fc6, fc6.new_zeros(4096, SEG_FEATURES)), dim=1)
    return state


def _build_for_training(
    segmentation_weights: str | Path | None,
    init_from_resmem: bool,
    storage_options: Mapping[str, Any] | None = None,
) -> M3M:
    fcn_path = locate_fcn_weights(segmentation_weights)
    seg = fcn_state_dict(fcn_path, storage_options)
    if not init_from_resmem:  # train from scratch: random ResMem part, published segmentation
        model = M3M()
        load_state_dict_strict(model.segmentation, seg, source=str(fcn_path))
        return model
    resmem_weights = ResMem_Weights.DEFAULT
    state = resmem_initial_state(resmem_weights.load_state_dict())
    state.update({f"segmentation.{k}": v for k, v in seg.items()})
    state.update({f"seg_reducer.{k}": v for k, v in _seg_reducer().state_dict().items()})
    # On the meta device: the 60M ResNet-152 and the head are not randomly initialised only to
    # be overwritten. Strict: a ResMem file with an unexpected or a missing key is refused.
    return build_with_weights(M3M, state, source=f"{resmem_weights.path()} + {fcn_path}")


def m3m_for_training(
    segmentation_weights: str | Path | None = None,
    *,
    init_from_resmem: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> M3M:
    """An M3M to fine-tune: published segmentation branch, ResMem's weights for the rest.

    Args:
        segmentation_weights: the ``fcn_resnet50_coco-1167a1af.pth`` file (local or URL); by
            default ``$MEMSCORE_FCN_WEIGHTS``, else the torch hub cache (``locate_fcn_weights``).
            It is required: a random frozen segmentation branch would feed the head noise.
        init_from_resmem: copy every ResMem tensor from the installed ``resmem`` package (see
            ``resmem_initial_state``); ``False`` leaves the ResMem part randomly initialised.
        storage_options: fsspec options for a remote ``segmentation_weights``.

    Raises:
        WeightsNotFoundError: the FCN file (or, with ``init_from_resmem``, the ``resmem``
            package) is not on this machine; the message says how to get it.

    Example:
        >>> model = m3m_for_training("/data/fcn_resnet50_coco-1167a1af.pth")  # doctest: +SKIP
        >>> model.train().segmentation.training  # doctest: +SKIP
        False
    """
    return _build_for_training(segmentation_weights, init_from_resmem, storage_options)


@register_model("m3m", M3M_Weights)
def m3m(
    *,
    weights: M3M_Weights | str | None = None,
    checkpoint: str | Path | None = None,
    storage_options: Mapping[str, Any] | None = None,
    segmentation_weights: str | Path | None = None,
    init_from_resmem: bool = False,
) -> M3M:
    """M3M from a ``checkpoint``, or newly initialised.

    Args:
        weights: ``M3M_Weights.TRAINED`` (``DEFAULT``) names the pipeline; without
            ``checkpoint`` it raises ``WeightsNotFoundError``, since no M3M weights are published.
        checkpoint: a state_dict file of ``M3M`` (``.safetensors`` or a torch file read with
            ``weights_only=True``), local or any fsspec URL, segmentation branch included;
            loaded strictly.
        storage_options: fsspec options for a remote ``checkpoint`` or ``segmentation_weights``.
        segmentation_weights, init_from_resmem: with either, the model is built for training as
            ``m3m_for_training`` does (the FCN file is then required). With neither and
            ``weights=None``, every tensor is random, the frozen segmentation branch included:
            such a model runs anywhere (tests, ``get_model("m3m", weights=None)``) and nothing
            is looked up on disk, but it is useless to train.
    """
    if checkpoint is not None:
        if segmentation_weights is not None or init_from_resmem:
            raise ValueError(
                "a checkpoint holds every M3M tensor: do not combine it with "
                "segmentation_weights or init_from_resmem"
            )
        return build_from_checkpoint(M3M, checkpoint, storage_options)
    if weights is not None:  # raises WeightsNotFoundError: nothing is published
        weights = M3M_Weights.verify(weights)
        return build_with_weights(M3M, weights.load_state_dict(), source=str(weights.path()))
    if segmentation_weights is not None or init_from_resmem:
        return _build_for_training(segmentation_weights, init_from_resmem, storage_options)
    return M3M()
