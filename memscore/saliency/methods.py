"""Map methods: for a batch of model inputs, an S x S map per image of where its score comes from.

Every method takes ``score(x) -> (N,)`` (a model that maps its input batch to one score per
image) or the model itself, the input batch ``x`` (N, 3, H, W) as the model takes it, and ``size``
S, and returns (N, S, S) float32, higher where the score comes from, over the model's input
crop: cell (i, j) covers rows ``i*H/S .. (i+1)*H/S`` and columns ``j*W/S .. (j+1)*W/S``.

- ``gradcam`` (Selvaraju et al. 2017) over the model's declared layers (``map_layers`` in its
  weights' meta; ResMem: its ResNet's ``features.layer4`` and its AlexNet-style ``conv5``):
  per layer, each channel's activation weighted by the mean gradient of the score over its
  positions, summed over channels; several layers' maps, brought to S x S, each scaled to
  0..1, are summed (their raw values, each layer's first-order share of the score, differ by
  orders of magnitude between ResMem's branches, and the larger would decide the sum alone).
  The trunk below the layers runs without autograd (the layers' outputs are leaves): one
  forward and a backward through the head only.
- ``occlusion`` (Zeiler and Fergus 2014): the score's fall when cell (i, j) is grey; S*S + 1
  forwards.
- ``rise`` (Petsiuk et al. 2018): the mean score over ``masks`` random coarse masks, each cell
  weighted by how often it was kept; ``masks`` forwards.
- ``integrated_gradients`` (Sundararajan et al. 2017) from a grey image, ``steps`` steps: the
  attributions' absolute values summed over channels and cells; ``steps`` forwards and full
  backwards.

Maps are signed contributions scaled per image to 0..1 (its lowest cell 0, its highest 1; a
constant map is zeros): their scale differs between images and methods, their ranking of
cells is what they say. Grad-CAM's customary ReLU is left out: at ResMem's ``conv5`` every
cell's share of the score is negative on most photos, and the ReLU'd map would be empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = [
    "GREY",
    "METHODS",
    "gradcam",
    "occlusion",
    "rise",
    "integrated_gradients",
    "cells_to_pixels",
    "normalise",
]

#: The value a removed region takes, in the model's input (ResMem's inputs are 0..1, not
#: normalised: 0.5 is mid-grey). The deletion test greys with the same value.
GREY = 0.5


def normalise(maps):
    """(N, S, S) -> each map scaled to 0..1 (its minimum 0, its maximum 1; a constant map:
    zeros). Only the order of a map's cells carries over between images and methods."""
    import torch

    flat = maps.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1)
    span = flat.amax(dim=1).view(-1, 1, 1) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-30), torch.zeros_like(maps))


def _to_cells(maps, size: int):
    """(N, h, w) -> (N, S, S): each layer's map resampled to the cells (bilinear to a fine grid,
    then averaged per cell, so any S works whatever h, w)."""
    import torch.nn.functional as F

    fine = max(size * 8, maps.shape[-1])
    fine = math.ceil(fine / size) * size
    up = F.interpolate(maps[:, None], size=(fine, fine), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(up, size)[:, 0]


def cells_to_pixels(cells, height: int, width: int):
    """(N, S, S) bool or float -> (N, 1, H, W): cell (i, j) over its rectangle of the input."""
    import torch.nn.functional as F

    return F.interpolate(cells[:, None].float(), size=(height, width), mode="nearest")


def gradcam(model, x, size: int, layers: Sequence[str], combine: str = "normalised"):
    """Grad-CAM over ``layers`` of ``model`` (module names); see the module docstring.

    ``combine``: how several layers' maps add up: "normalised" (each scaled to 0..1 first, so
    each layer counts alike: measured the more faithful for ResMem, whose ResNet's share of the
    score is about 10^4 times its AlexNet-style branch's) or "raw" (as they are, in the score's
    units).

    ``model`` must not need gradients below the layers: its parameters are not asked for any
    (they are frozen for the call), and ``x`` does not require grad."""
    import torch

    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def leaf(name):
        def hook(_module, _inputs, output):
            # the trunk below ran without autograd; from here on the graph is built
            leaf = output.detach().clone().requires_grad_(True)
            captured[name] = leaf
            # a copy goes on, so an in-place op after the layer (ReLU(inplace=True)) leaves
            # the leaf as it was
            return leaf.clone()

        return hook

    handles = [modules[name].register_forward_hook(leaf(name)) for name in layers]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            scores = model(x.clone())
            acts = [captured[name] for name in layers]
            grads = torch.autograd.grad(scores.sum(), acts)
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    total = None
    for act, grad in zip(acts, grads):
        weights = grad.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        cam = (weights * act).sum(dim=1).detach()  # (N, h, w), the score's units
        cells = _to_cells(cam, size)
        if combine == "normalised":
            cells = normalise(cells)
        total = cells if total is None else total + cells
    # no ReLU: where every cell's share is negative (measured: most photos at ResMem's conv5)
    # the ReLU'd map is empty; the signed map still ranks the cells
    return scores.detach(), normalise(total)


def occlusion(score: Callable, x, size: int, batch: int = 32):
    """The score's fall when each cell is grey (S*S + 1 forwards, ``batch`` images at once)."""
    import torch

    n, _, height, width = x.shape
    base = score(x)
    eye = torch.eye(size * size, dtype=torch.bool).view(-1, size, size)
    masks = cells_to_pixels(eye, height, width).bool()  # (S*S, 1, H, W)
    falls = torch.empty(n, size * size)
    for i in range(n):
        for start in range(0, size * size, batch):
            grey = masks[start : start + batch]
            occluded = torch.where(grey, torch.full_like(x[i : i + 1], GREY), x[i : i + 1])
            falls[i, start : start + len(grey)] = base[i] - score(occluded)
    # signed: a cell whose greying raises the score ranks below one that changes nothing
    return base, normalise(falls.view(n, size, size))


def rise(
    score: Callable,
    x,
    size: int,
    masks: int = 256,
    cells: int = 7,
    p: float = 0.5,
    seed: int = 0,
    batch: int = 32,
):
    """RISE: the score of ``masks`` random masks (``cells`` x ``cells`` keep/grey cells with
    keep probability ``p``, bilinearly upsampled with a random shift, as the paper's), per
    pixel weighted by the mask; brought to S x S."""
    import torch
    import torch.nn.functional as F

    n, _, height, width = x.shape
    generator = torch.Generator().manual_seed(seed)
    cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
    grid = (torch.rand(masks, 1, cells, cells, generator=generator) < p).float()
    up = F.interpolate(
        grid,
        size=((cells + 1) * cell_h, (cells + 1) * cell_w),
        mode="bilinear",
        align_corners=False,
    )
    shifts = torch.randint(0, cell_h, (masks, 2), generator=generator)
    soft = torch.stack(
        [up[m, :, dy : dy + height, dx : dx + width] for m, (dy, dx) in enumerate(shifts.tolist())]
    )  # (masks, 1, H, W) in 0..1
    base = score(x)
    saliency = torch.zeros(n, height, width)
    for i in range(n):
        for start in range(0, masks, batch):
            m = soft[start : start + batch]
            kept = x[i : i + 1] * m + GREY * (1 - m)
            s = score(kept)  # (b,)
            saliency[i] += (s.view(-1, 1, 1) * m[:, 0]).sum(dim=0)
    saliency /= masks * p
    return base, normalise(_to_cells(saliency, size))


def integrated_gradients(model, x, size: int, steps: int = 16):
    """Integrated gradients from the grey image (``steps`` Riemann midpoints): |attribution|
    summed over colour channels, then per cell."""
    import torch
    import torch.nn.functional as F

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone()  # a normal tensor, where the caller's may be an inference one
            total = torch.zeros_like(x)
            baseline = torch.full_like(x, GREY)
            for k in range(steps):
                alpha = (k + 0.5) / steps
                point = (baseline + alpha * (x - baseline)).requires_grad_(True)
                (grad,) = torch.autograd.grad(model(point).sum(), point)
                total += grad
            base = model(x).detach()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    attribution = ((x - baseline) * total / steps).abs().sum(dim=1)  # (N, H, W)
    return base, normalise(F.adaptive_avg_pool2d(attribution[:, None], size)[:, 0])


#: name -> what it needs: "layers" (the model's declared map layers) or "score" (any model).
METHODS = {
    "gradcam": "layers",
    "occlusion": "score",
    "rise": "score",
    "integrated-gradients": "model",
}
