"""One Ray task of renderings: build the model on the worker, render a batch of channels of one
layer, and check each PNG as saved against the channel's best dataset image.

Kept apart from ``render`` (the recipe, which knows nothing of registries or Ray) and from
``job`` (which only schedules): a task needs the model built as the scoring actors build it
(the same weights, on the worker, never in the driver).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

__all__ = ["CHANNELS_PER_TASK", "render_batch", "model_for_rendering"]

#: Channels rendered together in one task: one image each, one forward and backward per step
#: for all of them (a batch keeps a GPU busy; on a CPU it shares the forward's fixed costs).
CHANNELS_PER_TASK = 8


def model_for_rendering(model: str, weights, storage_options, use_gpu: bool):
    """(module on its device in eval mode, its input's (H, W), its normalisation or None)."""
    import torch

    from memscore.models.transforms import ImagePreprocess
    from memscore.stages.predict import load_model, pick_device

    module, chosen = load_model(model, weights, storage_options)
    preprocess = chosen.transforms
    if not isinstance(preprocess, ImagePreprocess):
        raise ValueError(
            f"{model}'s preprocessing ({type(preprocess).__name__}) is not one image in 0..1; "
            f"renderings need a model fed one crop (MemNet: --weights MODERN)"
        )
    device = pick_device(use_gpu)
    module = module.to(device).eval()
    normalize = None
    if preprocess.mean is not None or preprocess.std is not None:
        mean = torch.tensor(preprocess.mean or (0.0, 0.0, 0.0), device=device).view(1, 3, 1, 1)
        std = torch.tensor(preprocess.std or (1.0, 1.0, 1.0), device=device).view(1, 3, 1, 1)

        def normalize(x):
            return (x - mean) / std

    return module, (preprocess.crop, preprocess.crop), normalize


def render_batch(
    model: str,
    weights,
    storage_options,
    layer: str,
    channels: list[int],
    best: list[float],
    *,
    steps: int,
    seed: int,
    reduce: str,
    use_gpu: bool = False,
) -> list[dict[str, Any]]:
    """Render ``channels`` of ``layer``; -> per channel: its PNG's bytes, the channel's
    activation on that PNG read back as saved, the best dataset image's (``best``) and their
    ratio ``factor``, and the seconds spent per channel."""
    import time

    import torch
    from PIL import Image

    from memscore.feature_analysis.render import activation_of_pixels, png_bytes, render_channels

    module, size, normalize = model_for_rendering(model, weights, storage_options, use_gpu)
    if next(module.parameters()).device.type == "cpu":
        from memscore.stages.predict import local_cores

        torch.set_num_threads(local_cores())
    clock = time.perf_counter()
    images = render_channels(
        module,
        layer,
        channels,
        size=size,
        steps=steps,
        seed=seed,
        reduce=reduce,
        normalize=normalize,
    )
    seconds = (time.perf_counter() - clock) / max(1, len(channels))
    results = []
    for channel, pixels, best_value in zip(channels, images, best):
        data = png_bytes(pixels)
        saved = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # as the file holds it
        value = activation_of_pixels(module, layer, channel, saved, reduce, normalize)
        results.append(
            {
                "layer": layer,
                "channel": int(channel),
                "png": data,
                "activation": value,
                "best_image_activation": best_value,
                # how many times the best image's activation the rendering reaches; None where
                # the best image does not activate the channel at all (0 or below)
                "factor": value / best_value if best_value > 0 else None,
                "beats_best_image": bool(value > best_value),
                "seconds": round(seconds, 3),
            }
        )
    return results
