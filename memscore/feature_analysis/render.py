"""Feature visualization by activation optimization: the image that drives a channel most.

The recipe of Olah, Mordvintsev and Schubert, "Feature Visualization", Distill 2017
(https://distill.pub/2017/feature-visualization/), as their Lucid library implements it
(``lucid.optvis.param.spatial.fft_image``, ``param.color``, ``transform.standard_transforms``):

- **Parametrization**: the image is a spectrum in Fourier space, each frequency scaled by
  1 / frequency (so that the optimization does not favour high frequencies), turned into pixels
  by an inverse real FFT; its three channels are colour-decorrelated (multiplied by the square
  root of ImageNet's colour correlation matrix) and squashed into 0..1 by a sigmoid.
- **Robustness transforms**, new random ones each step: pad 12 (grey), jitter 8, scale by one
  of 0.9..1.1, rotate by one of -10..10 degrees, jitter 4. A rendering that drives the channel
  only at one exact pixel alignment is noise; these keep what survives small moves.
- **Objective**: the channel's activation averaged over positions (or its maximum, as the
  dataset's ``--reduce``), maximized with Adam (learning rate 0.05) for ``steps`` steps.

``torch-lucent`` (the PyTorch port, last released in 2021) was measured against the torch
memscore uses: see docs/features.md. This module is the recipe in one file, with a batch of
channels rendered together (one image per channel, each with its own objective) and the forward
stopped at the layer (the rest of the network is never run).

A rendering is checked as it is saved: the PNG's pixels (8 bits per channel, no resize) are run
through the model as a dataset image is, and the channel's activation on it is reported beside
the channel's best dataset image's (``factor``: how many times stronger).
"""

from __future__ import annotations

import io
import math

import numpy as np

__all__ = ["render_channels", "activation_of_pixels", "COLOR_CORRELATION_SVD_SQRT"]

#: Square root of the colour correlation of ImageNet's pixels (Lucid's
#: ``color_correlation_svd_sqrt``): decorrelated parameters become correlated RGB.
COLOR_CORRELATION_SVD_SQRT = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32
)

PAD = 12
JITTER = (8, 4)
SCALES = tuple(1 + (i - 5) / 50.0 for i in range(11))
ANGLES = tuple(range(-10, 11)) + (0,) * 5
LEARNING_RATE = 0.05


class _Stop(Exception):
    """Raised by the layer's hook: nothing after the layer is needed."""


def _layer_output(model, module, batch):
    """``module``'s output for ``batch``, running ``model`` only as far as that module."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["out"] = output
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "out" not in captured:
        raise RuntimeError("the forward pass did not reach the layer")
    return captured["out"]


def _channel_values(output, channels, reduce: str):
    """(B, C, ...) layer output -> (B,) the activation of image b's own channel ``channels[b]``."""
    import torch

    index = torch.as_tensor(channels, device=output.device)
    picked = output[torch.arange(len(channels), device=output.device), index]
    flat = picked.flatten(1)
    return flat.mean(dim=1) if reduce == "mean" else flat.amax(dim=1)


def _fft_scale(height: int, width: int, decay_power: float = 1.0):
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freqs = np.sqrt(fx * fx + fy * fy)
    return 1.0 / np.maximum(freqs, 1.0 / max(width, height)) ** decay_power


def _to_rgb(spectrum, height: int, width: int, scale):
    """Parameters (B, 3, H, W//2+1, 2) -> RGB images (B, 3, H, W) in 0..1."""
    import torch

    complex_spectrum = torch.view_as_complex(spectrum) * scale
    image = torch.fft.irfftn(complex_spectrum, s=(height, width), norm="ortho") / 4.0
    correlation = torch.as_tensor(COLOR_CORRELATION_SVD_SQRT, device=image.device)
    correlation = correlation / correlation.norm(dim=0).max()
    image = torch.einsum("bchw,dc->bdhw", image, correlation)
    return torch.sigmoid(image)


def _transform(images, generator):
    """Lucid's standard transforms, one random draw for the batch."""
    import torch
    import torch.nn.functional as F

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    def jitter(x, d):
        dy, dx = (int(v) for v in torch.randint(0, d + 1, (2,), generator=generator))
        h, w = x.shape[-2:]
        return x[..., dy : h - d + dy, dx : w - d + dx]

    x = F.pad(images, (PAD, PAD, PAD, PAD), value=0.5)
    x = jitter(x, JITTER[0])
    scale = pick(SCALES)
    angle = math.radians(pick(ANGLES))
    theta = torch.tensor(
        [
            [math.cos(angle) / scale, -math.sin(angle) / scale, 0.0],
            [math.sin(angle) / scale, math.cos(angle) / scale, 0.0],
        ],
        dtype=x.dtype,
        device=x.device,
    ).expand(x.shape[0], 2, 3)
    size = [x.shape[0], x.shape[1], round(x.shape[2] * scale), round(x.shape[3] * scale)]
    grid = F.affine_grid(theta, size, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return jitter(x, JITTER[1])


def render_channels(
    model,
    layer: str,
    channels: list[int],
    *,
    size: tuple[int, int],
    steps: int = 512,
    seed: int = 0,
    reduce: str = "mean",
    normalize=None,
    device=None,
) -> list[np.ndarray]:
    """One rendering per channel of ``layer``: uint8 (H, W, 3) RGB arrays of ``size``.

    ``normalize``: the model's input from 0..1 RGB (its preprocessing's mean and std), or None
    for a model fed 0..1 pixels (ResMem).
    """
    import torch

    device = device or next(model.parameters()).device
    module = dict(model.named_modules())[layer]
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    scale = torch.as_tensor(_fft_scale(height, width), dtype=torch.float32, device=device)
    spectrum = (
        torch.randn((len(channels), 3, height, width // 2 + 1, 2), generator=generator) * 0.01
    ).to(device)
    spectrum.requires_grad_(True)
    optimizer = torch.optim.Adam([spectrum], lr=LEARNING_RATE)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _ in range(steps):
        optimizer.zero_grad()
        images = _transform(_to_rgb(spectrum, height, width, scale), generator)
        batch = normalize(images) if normalize else images
        values = _channel_values(_layer_output(model, module, batch), channels, reduce)
        (-values.sum()).backward()
        optimizer.step()
    with torch.no_grad():
        final = _to_rgb(spectrum, height, width, scale)
    pixels = (final.permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().clip(0, 255)
    return list(pixels.astype(np.uint8))


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def activation_of_pixels(
    model, layer: str, channel: int, pixels: np.ndarray, reduce: str = "mean", normalize=None
) -> float:
    """The channel's activation for uint8 (H, W, 3) pixels fed as a dataset image's are
    (``ToTensor``: /255, no resize), through the model as far as ``layer``."""
    import torch

    device = next(model.parameters()).device
    batch = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255
    batch = batch.to(device)
    if normalize:
        batch = normalize(batch)
    module = dict(model.named_modules())[layer]
    with torch.inference_mode():
        output = _layer_output(model, module, batch)
        return float(_channel_values(output, [channel], reduce)[0])
