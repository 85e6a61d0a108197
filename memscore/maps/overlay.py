"""One photo with its memorability map over the region the model saw.

A map's S x S cells cover the model's input crop (``saliency.methods``). For ResMem the photo
is resized to 256 x 256 (its aspect ratio not kept) and the central 227 x 227 taken, so on the
photo the crop is the central 227/256 of its width and of its height (``crop_box``); a
pipeline with no crop (MemNet's ten crops of the whole resized image) covers the whole photo.
The overlay is the photo at its own size, the map drawn there in a colour scale (dark: little
of the score, bright yellow: most), the part the model never saw dimmed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["crop_box", "overlay", "COLOURS"]

#: The colour scale, from a map's 0 to its 1 (a perceptually ordered dark-to-bright ramp, close
#: to matplotlib's "inferno", written out so drawing needs no plotting package).
COLOURS = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    np.float32,
)


def crop_box(preprocess, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) on a ``width`` x ``height`` photo of the crop the model saw."""
    resize = getattr(preprocess, "resize", None)
    crop = getattr(preprocess, "crop", None)
    if not resize or not crop:
        return (0, 0, width, height)
    resized_h, resized_w = resize
    # the crop's corner on the resized image, as _center_crop (torchvision) rounds it
    top = int(round((resized_h - crop) / 2.0))
    left = int(round((resized_w - crop) / 2.0))
    sx, sy = width / resized_w, height / resized_h
    return (
        int(round(left * sx)),
        int(round(top * sy)),
        int(round((left + crop) * sx)),
        int(round((top + crop) * sy)),
    )


def _colour(values: np.ndarray) -> np.ndarray:
    """values in 0..1 (H, W) -> RGB uint8 (H, W, 3) along ``COLOURS``."""
    position = np.clip(values, 0, 1) * (len(COLOURS) - 1)
    low = np.floor(position).astype(int).clip(0, len(COLOURS) - 2)
    fraction = (position - low)[..., None]
    return (COLOURS[low] * (1 - fraction) + COLOURS[low + 1] * fraction).astype(np.uint8)


def overlay(photo, cells: np.ndarray, box: tuple[int, int, int, int], alpha: float = 0.6):
    """``photo`` (PIL RGB) with ``cells`` (S, S, values 0..1) drawn over ``box``; -> PIL RGB
    of the photo's size."""
    from PIL import Image

    left, top, right, bottom = box
    width, height = right - left, bottom - top
    heat = Image.fromarray(np.asarray(cells, np.float32), mode="F").resize(
        (max(1, width), max(1, height)), Image.BILINEAR
    )
    coloured = _colour(np.asarray(heat))
    base = np.asarray(photo.convert("RGB"), np.float32)
    out = base * 0.45  # outside the crop: dimmed, the model never saw it
    region = base[top:bottom, left:right]
    out[top:bottom, left:right] = (
        region * (1 - alpha) + coloured[: region.shape[0], : region.shape[1]] * alpha
    )
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
