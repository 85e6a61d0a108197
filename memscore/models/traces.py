"""Memorability traces (Takmaz et al. 2025): per-layer statistics of a vision transformer.

``--model clip-traces|dinov2-traces|siglip2-traces`` run an encoder (``memscore.models.encoders``)
over each image and write six list<float32> columns, one value per layer, with no memorability
training at all: the paper found that some of them follow human memorability (on MemCat,
Spearman +0.36 for CLIP's CLS mean at layer 1, +0.355 for DINOv2's attention entropy at layer
10, -0.334 for its patch uniformity at layer 8).

With ``hs`` the hidden states 0..L (0: the embeddings as the first block sees them; L: the last
block's output, before any post-layernorm) and ``att`` the attention maps of blocks 1..L:

* ``cls_mean``, ``cls_max``, ``cls_maxabs`` (L+1 values): token 0's mean, max and max |.|;
* ``cls_delta`` (L): ``1 - cos(hs[i][0], hs[i+1][0])``;
* ``attention_entropy`` (L): token 0's row of ``att[i]``, averaged over heads, without its
  weight on itself, renormalised to sum 1: its Shannon entropy in bits;
* ``patch_uniformity`` (L+1): the mean cosine similarity between distinct patch tokens (1..)
  of ``hs[i]``, as one batched matrix product (the paper's leave-one-out loop gives the same
  number: each patch's mean similarity to the others, averaged over patches).

SigLIP has no CLS token; as the paper's code does, its token 0 (a patch) is treated as "CLS"
and tokens 1.. as the patches.

The attention maps are not kept: a forward hook on each attention module reduces its map to
token 0's head-averaged row as soon as it is made, so a batch holds one layer's maps at a time
(DINOv2-base, 32 images: 100 MB instead of 1.2 GB for all twelve). The traces are computed in
float32 whatever ``--precision`` the forward pass runs in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memscore.models._api import FolderWeights
from memscore.models.registry import register_model
from memscore.models.weights import (
    TRACE_FEATURES,
    CLIPTraces_Weights,
    DINOv2Traces_Weights,
    SigLIP2Traces_Weights,
)

__all__ = [
    "EncoderTraces",
    "compute_traces",
    "clip_traces",
    "dinov2_traces",
    "siglip2_traces",
    "CLIPTraces_Weights",
    "DINOv2Traces_Weights",
    "SigLIP2Traces_Weights",
]


def compute_traces(hidden_states, cls_attention) -> dict[str, torch.Tensor]:
    """The six traces from an encoder's outputs.

    Args:
        hidden_states: L+1 tensors ``[N, T, d]`` (embeddings, then each block's output).
        cls_attention: L tensors ``[N, T]``: token 0's attention row of each block, averaged
            over heads.

    Returns:
        feature name (``TRACE_FEATURES``) -> float32 ``[N, L+1]`` or ``[N, L]``.
    """
    cls = torch.stack([h[:, 0] for h in hidden_states], dim=1).float()  # [N, L+1, d]
    traces = {
        "cls_mean": cls.mean(-1),
        "cls_max": cls.amax(-1),
        "cls_maxabs": cls.abs().amax(-1),
        "cls_delta": 1 - F.cosine_similarity(cls[:, :-1], cls[:, 1:], dim=-1),
    }
    rows = torch.stack(list(cls_attention), dim=1).float()[..., 1:]  # [N, L, T-1]
    p = rows / rows.sum(-1, keepdim=True)
    traces["attention_entropy"] = -torch.special.xlogy(p, p).sum(-1) / math.log(2)
    # One matrix product over every layer: the Gram matrix of the unit patch vectors, whose
    # off-diagonal mean is the mean pairwise cosine. The diagonal is zeroed rather than
    # subtracted, and the sum taken in float64, so nothing cancels when patches are nearly
    # orthogonal.
    patches = F.normalize(
        torch.stack([h[:, 1:] for h in hidden_states], dim=1).float(), dim=-1, eps=1e-8
    )  # [N, L+1, M, d]
    gram = patches @ patches.transpose(-1, -2)  # [N, L+1, M, M]
    gram.diagonal(dim1=-2, dim2=-1).zero_()
    m = patches.shape[-2]
    traces["patch_uniformity"] = (gram.sum((-2, -1), dtype=torch.float64) / (m * (m - 1))).float()
    return {name: traces[name] for name in TRACE_FEATURES}


class EncoderTraces(nn.Module):
    """An encoder whose forward gives its traces: pixels ``[N, 3, H, W]`` -> dict of
    ``<encoder>_<feature>`` -> float32 ``[N, L+1]`` or ``[N, L]`` (see the module docstring).

    Args:
        encoder: ``clip``, ``dinov2`` or ``siglip2``.
        model: the transformers model, with eager attention (``encoders.load_encoder``).
    """

    def __init__(self, encoder: str, model: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.model = model
        self._rows: list[torch.Tensor] | None = None
        attention = type(model)._can_record_outputs["attentions"]
        blocks = [m for m in model.modules() if isinstance(m, attention)]
        if len(blocks) != model.config.num_hidden_layers:
            raise ValueError(
                f"found {len(blocks)} {attention.__name__} modules for "
                f"{model.config.num_hidden_layers} layers"
            )
        for block in blocks:
            block.register_forward_hook(self._keep_cls_row)

    def _keep_cls_row(self, module, args, output) -> None:
        if self._rows is None:  # the model run outside this module's forward
            return
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(
                f"{type(module).__name__} returned no attention weights: load "
                f"the model with attn_implementation='eager'"
            )
        self._rows.append(weights[:, :, 0, :].float().mean(1))  # [N, T]

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        self._rows = []
        try:
            outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
            rows = self._rows
        finally:
            self._rows = None
        # float32 traces whatever the forward's precision (--precision bf16 runs it in autocast)
        with torch.autocast(pixel_values.device.type, enabled=False):
            traces = compute_traces(outputs.hidden_states, rows)
        return {f"{self.encoder}_{name}": value for name, value in traces.items()}


def _traces(
    encoder: str, weights: FolderWeights | None, storage_options: Mapping[str, Any] | None
) -> EncoderTraces:
    from memscore.models.encoders import load_encoder, random_encoder

    if weights is None:  # the Base-size architecture, randomly initialised
        return EncoderTraces(encoder, random_encoder(encoder))
    model, _ = load_encoder(encoder, weights.folder, storage_options)
    return EncoderTraces(encoder, model)


@register_model("clip-traces", CLIPTraces_Weights)
def clip_traces(
    *, weights: FolderWeights | None = None, storage_options: Mapping[str, Any] | None = None
) -> EncoderTraces:
    """CLIP ViT-B/32's traces; ``weights`` from ``weights_for("clip-traces", ...)`` (None: a
    randomly initialised ViT-B/32)."""
    return _traces("clip", weights, storage_options)


@register_model("dinov2-traces", DINOv2Traces_Weights)
def dinov2_traces(
    *, weights: FolderWeights | None = None, storage_options: Mapping[str, Any] | None = None
) -> EncoderTraces:
    """DINOv2-base's traces; ``weights`` as for ``clip_traces``."""
    return _traces("dinov2", weights, storage_options)


@register_model("siglip2-traces", SigLIP2Traces_Weights)
def siglip2_traces(
    *, weights: FolderWeights | None = None, storage_options: Mapping[str, Any] | None = None
) -> EncoderTraces:
    """SigLIP2 base/16-224's traces (token 0 taken as CLS); ``weights`` as for ``clip_traces``."""
    return _traces("siglip2", weights, storage_options)
