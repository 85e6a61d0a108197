"""Preprocessing that belongs to a set of weights, split in two halves.

A model's input pipeline is split where it is cheapest to ship data between machines:

* ``to_array`` runs in the CPU decode stage: PIL image (RGB) -> resized, cropped uint8 HWC array.
  uint8 is a quarter of the float32 tensor's size, which is what travels through Ray's object
  store to the model actors.
* ``to_tensor`` runs on the model actor: a uint8 NHWC batch -> float NCHW tensor scaled to 0..1
  (and normalised, where the weights say so).

``to_tensor(to_array(img))`` is bit-identical to the torchvision pipeline the published models
were served with (``Resize((256, 256))``, ``CenterCrop(227)``, ``ToTensor()``): the PIL half uses
torchvision's own transforms, and ``ToTensor`` is exactly ``uint8 -> float32 / 255``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ImagePreprocess"]


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize to ``resize`` (height, width), centre-crop to ``crop``, scale to 0..1.

    Args:
        resize: (height, width) of the resize, done by Pillow with bilinear interpolation as
            torchvision's ``Resize`` does on PIL images.
        crop: side of the square centre crop taken after the resize.
        mean: per-channel mean subtracted after scaling to 0..1; ``None`` for none (ResMem).
        std: per-channel standard deviation divided by; ``None`` for none.

    Example:
        >>> from PIL import Image
        >>> pre = ImagePreprocess(resize=(256, 256), crop=227)
        >>> pre(Image.new("RGB", (640, 480))).shape
        torch.Size([3, 227, 227])
    """

    resize: tuple[int, int] = (256, 256)
    crop: int = 227
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @property
    def array_shape(self) -> tuple[int, int, int]:
        """Shape of what ``to_array`` returns: (crop, crop, 3)."""
        return (self.crop, self.crop, 3)

    def to_array(self, image) -> np.ndarray:
        """PIL image in mode RGB -> uint8 array of shape ``array_shape``."""
        from torchvision.transforms import functional as F

        if image.mode != "RGB":
            raise ValueError(f"to_array expects an RGB image, got mode {image.mode}")
        image = F.resize(image, list(self.resize))
        image = F.center_crop(image, [self.crop, self.crop])
        return np.asarray(image, dtype=np.uint8)

    def to_tensor(self, arrays: np.ndarray):
        """uint8 array (N, H, W, 3) -> float32 tensor (N, 3, H, W), as ``ToTensor`` computes it."""
        import torch

        arrays = np.ascontiguousarray(arrays)
        if not arrays.flags.writeable:  # a zero-copy view of an Arrow buffer; torch wants to own it
            arrays = arrays.copy()
        batch = torch.from_numpy(arrays).permute(0, 3, 1, 2)
        batch = batch.to(torch.float32).div(255)
        if self.mean is not None:
            batch = batch - torch.tensor(self.mean).view(1, 3, 1, 1)
        if self.std is not None:
            batch = batch / torch.tensor(self.std).view(1, 3, 1, 1)
        return batch.contiguous()

    def __call__(self, image):
        """PIL image (RGB) -> float tensor (3, crop, crop): the whole pipeline for one image."""
        return self.to_tensor(self.to_array(image)[None])[0]
