"""ResMem (Needell & Bainbridge): memorability from an AlexNet-style branch and a ResNet-152.

The conv branch's 9216 features and the ResNet-152's 1000 logits are concatenated and passed
through a fully connected head ending in a sigmoid. The module and parameter names follow the
published ``resmem/model.pt`` exactly, so that file loads with ``strict=True`` and no key map.
The input is *not* normalised: the published model was trained on ``ToTensor()`` output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet152

from memscore.models._api import build_from_checkpoint, build_with_weights
from memscore.models.registry import register_model
from memscore.models.weights import ResMem_Weights

__all__ = ["ResMem", "ResMem_Weights", "resmem"]

# The branch and head below are public because FalseResMem and M3M are ResMem with another
# backbone beside the same AlexNet-style branch and head (their modules build them from here).


def alexnet_layers(module: nn.Module, width: int = 384) -> None:
    # The layers are attributes of the model itself, not a submodule, because that is where the
    # published checkpoints keep them (`conv1.weight`, not `branch.conv1.weight`).
    # `width` is the published code's "cruise_altitude": conv3-conv5 channels.
    module.conv1 = nn.Conv2d(3, 48, kernel_size=11, stride=4)
    module.pool1 = nn.MaxPool2d(3, 2)
    module.lrn1 = nn.LocalResponseNorm(5)
    module.conv2 = nn.Conv2d(48, 256, kernel_size=5, stride=1, padding=2, groups=2)
    module.pool2 = nn.MaxPool2d(3, 2)
    module.lrn2 = nn.LocalResponseNorm(5)
    module.conv3 = nn.Conv2d(256, width, kernel_size=3, stride=1, padding=1, groups=2)
    module.conv4 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, groups=2)
    module.conv5 = nn.Conv2d(width, 256, kernel_size=3, stride=1, padding=1, groups=2)
    module.pool5 = nn.MaxPool2d(kernel_size=3, stride=2)


def alexnet_features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = module.lrn1(module.pool1(F.relu(module.conv1(x))))
    x = module.lrn2(module.pool2(F.relu(module.conv2(x))))
    x = F.relu(module.conv3(x))
    x = F.relu(module.conv4(x))
    x = module.pool5(F.relu(module.conv5(x)))
    return torch.flatten(x, 1)  # 256 x 6 x 6 = 9216 for a 227x227 input


def head_layers(module: nn.Module, in_features: int) -> None:
    module.fc6 = nn.Linear(in_features, 4096)
    module.drp6 = nn.Dropout(0.5)
    module.fc7 = nn.Linear(4096, 4096)
    module.drp7 = nn.Dropout(0.5)
    module.fc8 = nn.Linear(4096, 2048)
    module.drp8 = nn.Dropout(0.5)
    module.fc9 = nn.Linear(2048, 1024)
    module.fc10 = nn.Linear(1024, 512)
    module.fc11 = nn.Linear(512, 256)
    module.fc12 = nn.Linear(256, 1)


def head(
    module: nn.Module, features: torch.Tensor, *, dropout_after_fc8: bool = False
) -> torch.Tensor:
    x = module.drp6(F.relu(module.fc6(features)))
    # The published forward applies drp8 after fc7 (drp7 is defined but unused); kept as is so
    # training behaves as the paper's code did. Dropout is a no-op in eval mode either way.
    x = module.drp8(F.relu(module.fc7(x)))
    x = F.relu(module.fc8(x))
    if dropout_after_fc8:  # FalseResMem's published forward adds drp9 here
        x = module.drp9(x)
    x = F.relu(module.fc9(x))
    x = F.relu(module.fc10(x))
    x = F.relu(module.fc11(x))
    return torch.sigmoid(module.fc12(x)).squeeze(1)


class ResMem(nn.Module):
    """ResMem: (N, 3, 227, 227) float in 0..1 -> (N,) memorability in 0..1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = resnet152(weights=None)
        alexnet_layers(self)
        head_layers(self, in_features=9216 + 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head(self, torch.cat((alexnet_features(self, x), self.features(x)), dim=1))


@register_model("resmem", ResMem_Weights)
def resmem(
    *,
    weights: ResMem_Weights | None = None,
    checkpoint: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ResMem:
    """ResMem with ``weights`` (``ResMem_Weights.RETRAIN``, the published ones), a ``checkpoint``
    file of its state_dict (local or URL, e.g. a fine-tuned one), or random init."""
    if checkpoint is not None:
        return build_from_checkpoint(ResMem, checkpoint, storage_options)
    if weights is None:
        return ResMem()
    weights = ResMem_Weights.verify(weights)
    return build_with_weights(ResMem, weights.load_state_dict(), source=str(weights.path()))
