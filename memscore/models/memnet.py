"""MemNet (Khosla, Raju, Torralba & Oliva, ICCV 2015): an AlexNet regressing memorability.

conv1 96x11x11/4, ReLU, max-pool 3/2, LRN(5); conv2 256x5x5 pad 2 groups 2, ReLU, pool, LRN;
conv3 384x3x3; conv4 384x3x3 groups 2; conv5 256x3x3 groups 2, pool; fc6 4096 and fc7 4096
(ReLU, dropout 0.5); fc8 one output. Two pipelines, chosen by the weights member (``mode``):

``legacy`` -- the original Caffe serving path.
    CPU half (``TenCropPreprocess.to_array``): resize to 256x256, uint8 RGB, no crop.
    Actor half (``TenCropPreprocess.to_tensor``): float BGR on the 0..255 scale (no /255).
    Model (``MemNet(mode="legacy")``, input N x 3 x 256 x 256): subtract the mean image (the
    ``mean`` buffer, 3x256x256 BGR, saved in every legacy checkpoint), cut the ten 227x227 crops
    as one batch of 10N (``ten_crop``), run the network once, average the ten fc8 outputs per
    image and map them with ``clip((y - 0.7626) * 2 + 0.65, 0, 1)`` (``output_mapping``).
    The mean subtraction lives in the model, not the transforms, because the mean image belongs
    to the weights: as a buffer it travels in the checkpoint and is loaded strictly with them.
    A freshly built model's mean is the per-channel ImageNet Caffe mean (B, G, R) =
    (104, 117, 123) broadcast to 3x256x256.

``modern`` -- the single-centre-crop path of the paper's PyTorch reimplementations.
    ``ImagePreprocess(resize=(256, 256), crop=227)`` (RGB, 0..1, as ResMem), input
    N x 3 x 227 x 227, output ``sigmoid(fc8)``. No mean buffer.

No MemNet weights ship with or are downloadable by memscore: both weights members describe a
pipeline only, and loading them raises ``WeightsNotFoundError``. Parameters come from a
checkpoint file (``memnet(weights=..., checkpoint=PATH)``, local or any fsspec URL), loaded
without unpickling code and strictly (a missing or extra key is a ``CheckpointKeyError``).

The layer names (``conv1`` ... ``conv5``, ``fc6`` ... ``fc8``, attributes of the model itself)
are those of pretorched-x's conversion (``alexandonian/pretorched-x``,
``pretorched/models/memnet.py``, whose ``memnet_lamem-a92fdac2.pth`` is loaded there with a
strict ``load_state_dict``); ``from_pretorched_state_dict`` turns such a state_dict into a
checkpoint of this module. Whether that converted file expects the legacy or the modern input
was not checked here (its settings claim RGB 0..1 with ImageNet mean/std, its forward applies
the legacy output mapping): validate on LaMem before trusting its scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memscore.models._api import (
    CheckpointKeyError,
    build_with_weights,
    load_state_dict_file,
)
from memscore.models.registry import register_model
from memscore.models.weights import (
    MEMNET_CROP_SIZE as CROP_SIZE,
    MEMNET_INPUT_SIZE as INPUT_SIZE,
    MEMNET_NO_WEIGHTS_MESSAGE as NO_WEIGHTS_MESSAGE,
    MemNet_Weights,
)

__all__ = [
    "CAFFE_MEAN_BGR",
    "MODES",
    "MemNet",
    "MemNet_Weights",
    "NO_WEIGHTS_MESSAGE",
    "PRETORCHED_KEYS",
    "from_pretorched_state_dict",
    "memnet",
    "output_mapping",
    "ten_crop",
]

MODES = ("legacy", "modern")
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)  # ImageNet mean on 0..255, Caffe's B, G, R order
OUTPUT_MEAN, OUTPUT_SCALE, OUTPUT_BIAS = 0.7626, 2.0, 0.65


# The keys of pretorched-x's converted state_dict (memnet_lamem-a92fdac2.pth), read off
# pretorched/models/memnet.py in alexandonian/pretorched-x (commit 799b6aab): the layers are
# plain attributes conv1..conv5, fc6..fc8 and the checkpoint is loaded with strict=True there.
PRETORCHED_KEYS = tuple(
    f"{layer}.{kind}"
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
    for kind in ("weight", "bias")
)


def ten_crop(x: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """(N, C, H, W) -> (N * 10, C, size, size): Caffe's oversampling, as one batched tensor.

    Image-major: rows ``10 * n`` to ``10 * n + 9`` are image ``n``'s crops, in the order of
    ``caffe.io.oversample``: top-left, top-right, bottom-left, bottom-right, centre, then the
    same five mirrored (flipped on the width axis). For 256 -> 227 the (top, left) offsets are
    (0, 0), (0, 29), (29, 0), (29, 29) and (14, 14); the centre offset is torchvision
    ``CenterCrop``'s, ``int(round((H - size) / 2))``.
    """
    # Not torchvision.transforms.v2.functional.ten_crop: its first five crops are these, but
    # it takes the other five from the mirrored image rather than mirroring these five, and as
    # 256 - 227 = 29 is odd its mirrored centre crop starts one column right of Caffe's
    # (column 15, not 14). The ten-crop mean of a random-init legacy MemNet's fc8 moved by up
    # to 5.2e-3 (on outputs of about 0.08, 8 random images): a different score, not float noise.
    n, c, h, w = x.shape
    if h < size or w < size:
        raise ValueError(f"ten_crop needs at least {size}x{size} images, got {h}x{w}")
    dy, dx = h - size, w - size
    offsets = ((0, 0), (0, dx), (dy, 0), (dy, dx), (int(round(dy / 2.0)), int(round(dx / 2.0))))
    crops = [x[:, :, top : top + size, left : left + size] for top, left in offsets]
    crops += [crop.flip(-1) for crop in crops]
    return torch.stack(crops, dim=1).reshape(n * 10, c, size, size)


def output_mapping(y: torch.Tensor) -> torch.Tensor:
    """The Caffe model's calibration of its raw output: ``clip((y - 0.7626) * 2 + 0.65, 0, 1)``."""
    return ((y - OUTPUT_MEAN) * OUTPUT_SCALE + OUTPUT_BIAS).clamp(0.0, 1.0)


class MemNet(nn.Module):
    """MemNet in ``mode`` ``"legacy"`` or ``"modern"`` (see the module docstring).

    legacy: (N, 3, 256, 256) float BGR 0..255 -> (N,) in [0, 1] (ten crops, averaged, clipped).
    modern: (N, 3, 227, 227) float RGB 0..1 -> (N,) in (0, 1) (sigmoid).
    """

    def __init__(self, mode: str = "legacy") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"MemNet mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.conv1 = nn.Conv2d(3, 96, kernel_size=11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2)
        # Caffe pools with ceil rounding; on 55, 27 and 13 it gives the same sizes as floor.
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.norm = nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0)  # Caffe's LRN
        self.fc6 = nn.Linear(256 * 6 * 6, 4096)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Linear(4096, 4096)
        self.drop7 = nn.Dropout(0.5)
        self.fc8 = nn.Linear(4096, 1)
        if mode == "legacy":
            mean = torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float32).view(3, 1, 1)
            self.register_buffer("mean", mean.expand(3, INPUT_SIZE, INPUT_SIZE).clone())

    @property
    def input_size(self) -> tuple[int, int, int]:
        side = INPUT_SIZE if self.mode == "legacy" else CROP_SIZE
        return (3, side, side)

    def subtract_mean(self, x: torch.Tensor) -> torch.Tensor:
        """legacy: BGR 0..255 (N, 3, 256, 256) minus the mean image, as Caffe fed the network."""
        if self.mode != "legacy":
            raise RuntimeError("only a legacy MemNet has a mean image")
        return x - self.mean

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network on (M, 3, 227, 227) -> fc8, shape (M,): no cropping, no output mapping."""
        x = self.norm(self.pool(F.relu(self.conv1(x))))
        x = self.norm(self.pool(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = self.pool(F.relu(self.conv5(x)))
        x = self.drop6(F.relu(self.fc6(torch.flatten(x, 1))))
        x = self.drop7(F.relu(self.fc7(x)))
        return self.fc8(x).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_size:
            raise ValueError(
                f"a {self.mode} MemNet takes (N, {', '.join(map(str, self.input_size))}) input, "
                f"got {tuple(x.shape)}"
            )
        if self.mode == "modern":
            return torch.sigmoid(self.logits(x))
        n = x.shape[0]
        y = self.logits(ten_crop(self.subtract_mean(x)))  # all 10N crops in one batch
        return output_mapping(y.view(n, 10).mean(dim=1))


def from_pretorched_state_dict(
    state_dict: Mapping[str, Any], mode: str = "legacy", mean: torch.Tensor | None = None
) -> dict:
    """pretorched-x's converted MemNet state_dict (``memnet_lamem``) -> a ``MemNet(mode)`` one.

    The keys must be exactly ``PRETORCHED_KEYS`` (else ``CheckpointKeyError`` naming the odd
    ones); they are kept as they are. A legacy model also needs its mean image: ``mean``
    (3x256x256, BGR, 0..255), or the per-channel ImageNet Caffe mean where none is given, which
    the converted file does not carry. Save the result (``safetensors`` or ``torch.save``) and
    load it with ``memnet(weights=..., checkpoint=PATH)``.
    """
    if mode not in MODES:
        raise ValueError(f"MemNet mode must be one of {MODES}, got {mode!r}")
    missing = sorted(set(PRETORCHED_KEYS) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(PRETORCHED_KEYS))
    if missing or unexpected:
        raise CheckpointKeyError(
            "not a pretorched-x MemNet state_dict: "
            + "; ".join(
                part
                for part in (
                    f"missing keys: {', '.join(missing)}" if missing else "",
                    f"unexpected keys: {', '.join(unexpected)}" if unexpected else "",
                )
                if part
            )
        )
    out = {key: state_dict[key] for key in PRETORCHED_KEYS}
    if mode == "legacy":
        if mean is None:
            mean = torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float32).view(3, 1, 1)
        out["mean"] = (
            torch.as_tensor(mean, dtype=torch.float32).expand(3, INPUT_SIZE, INPUT_SIZE).clone()
        )
    return out


@register_model("memnet", MemNet_Weights)
def memnet(
    *,
    weights: MemNet_Weights | str | None = None,
    mode: str | None = None,
    checkpoint: str | Path | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> MemNet:
    """MemNet, randomly initialised or loaded strictly from ``checkpoint``.

    Args:
        weights: a ``MemNet_Weights`` member (or its name): picks the pipeline (``mode``) and
            the preprocessing. Without ``checkpoint`` it raises ``WeightsNotFoundError``, since
            no MemNet weights are published for memscore.
        mode: ``"legacy"`` or ``"modern"``; defaults to the weights' mode, else ``"legacy"``.
            A mode that contradicts ``weights`` is a ``ValueError``.
        checkpoint: a state_dict file of ``MemNet(mode)`` (``.safetensors`` or a torch file,
            read with ``weights_only=True``), local or any fsspec URL.
        storage_options: fsspec options for a remote ``checkpoint``.
    """
    if weights is not None:
        weights = MemNet_Weights.verify(weights)
        if mode is not None and mode != weights.meta["mode"]:
            raise ValueError(
                f"mode {mode!r} contradicts weights {weights.name} (mode {weights.meta['mode']!r})"
            )
        mode = weights.meta["mode"]
    mode = mode or "legacy"
    if mode not in MODES:
        raise ValueError(f"MemNet mode must be one of {MODES}, got {mode!r}")
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint, storage_options)
        return build_with_weights(lambda: MemNet(mode), state, source=str(checkpoint))
    if weights is not None:  # raises WeightsNotFoundError: nothing is published
        return build_with_weights(
            lambda: MemNet(mode), weights.load_state_dict(), source=str(weights.path())
        )
    return MemNet(mode)
