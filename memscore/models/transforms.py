"""Preprocessing that belongs to a set of weights, split in two halves.

A model's input pipeline is split where it is cheapest to ship data between machines:

* ``to_array`` runs in the CPU decode stage: PIL image (RGB) -> resized, cropped uint8 HWC array.
  uint8 is a quarter of the float32 tensor's size, which is what travels through Ray's object
  store to the model actors.
* ``to_tensor`` runs on the model actor: a uint8 NHWC batch -> float NCHW tensor scaled to 0..1
  (and normalised, where the weights say so).

``to_tensor(to_array(img))`` is bit-identical to the torchvision pipeline the published models
were served with (``Resize((256, 256))``, ``CenterCrop(227)``, ``ToTensor()``): the PIL half makes
the very Pillow calls torchvision's transforms make on PIL images (tested against them), without
importing torch, and ``ToTensor`` is exactly ``uint8 -> float32 / 255``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ImagePreprocess", "TenCropPreprocess"]


def _resize(image, size: tuple[int, int]):
    """torchvision ``F.resize(pil, [h, w])``, which is this Pillow call (bilinear, antialiased).

    Written with Pillow alone so that the CPU decode workers never import torch: on a 2-core
    machine each decode worker importing torchvision cost seconds of CPU at the start of every
    run (while the model actor loads) and about 0.5 GB of memory per worker.
    """
    from PIL import Image

    return image.resize((size[1], size[0]), Image.BILINEAR)


def _center_crop(image, size: int):
    """torchvision ``F.center_crop`` on a PIL image at least ``size`` on each side."""
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {width}x{height} image")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


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
        if image.mode != "RGB":
            raise ValueError(f"to_array expects an RGB image, got mode {image.mode}")
        return np.asarray(_center_crop(_resize(image, self.resize), self.crop), dtype=np.uint8)

    def to_tensor(self, arrays: np.ndarray, memory_format=None):
        """uint8 array (N, H, W, 3) -> float32 tensor (N, 3, H, W), as ``ToTensor`` computes it.

        ``memory_format``: the tensor's layout (default ``torch.contiguous_format``);
        ``torch.channels_last`` costs no extra copy, the NHWC input being in that layout already.
        """
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
        return batch.contiguous(memory_format=memory_format or torch.contiguous_format)

    def __call__(self, image):
        """PIL image (RGB) -> float tensor (3, crop, crop): the whole pipeline for one image."""
        return self.to_tensor(self.to_array(image)[None])[0]


@dataclass(frozen=True)
class TenCropPreprocess:
    """The Caffe-style half of an oversampling pipeline: resize only; the crops are cut later.

    The CPU half (``to_array``) resizes to ``resize`` and returns the whole uint8 RGB image: the
    ten ``crop`` x ``crop`` crops (four corners and the centre, each also mirrored) are cut by the
    model on its actor as one batched tensor (see ``memscore.models.memnet.ten_crop``), so ten
    times fewer pixels travel through the object store. The model half (``to_tensor``) gives a
    float tensor in **BGR** order on the **0..255** scale, as Caffe's ``caffe.io`` pipeline does
    after ``raw_scale=255`` and ``channel_swap=(2, 1, 0)``. The mean image is *not* subtracted
    here: it belongs to the weights, so it lives in the model as a buffer that travels in the
    checkpoint (``MemNet.subtract_mean``).

    Args:
        resize: (height, width) of the resize, done by Pillow with bilinear interpolation as
            torchvision's ``Resize`` does on PIL images. (Caffe resized with ``caffe.io``
            (scikit-image, order 1) instead, so pixels differ from the original serving path by
            about a grey level; the geometry is the same.)
        crop: side of the crops the model cuts (informational here).

    Example:
        >>> from PIL import Image
        >>> pre = TenCropPreprocess()
        >>> pre(Image.new("RGB", (640, 480), (255, 0, 0)))[:, 0, 0].tolist()
        [0.0, 0.0, 255.0]
    """

    resize: tuple[int, int] = (256, 256)
    crop: int = 227

    @property
    def array_shape(self) -> tuple[int, int, int]:
        """Shape of what ``to_array`` returns: (height, width, 3) of the resize."""
        return (self.resize[0], self.resize[1], 3)

    def to_array(self, image) -> np.ndarray:
        """PIL image in mode RGB -> uint8 RGB array of shape ``array_shape`` (no crop)."""
        if image.mode != "RGB":
            raise ValueError(f"to_array expects an RGB image, got mode {image.mode}")
        return np.asarray(_resize(image, self.resize), dtype=np.uint8)

    def to_tensor(self, arrays: np.ndarray, memory_format=None):
        """uint8 RGB array (N, H, W, 3) -> float32 tensor (N, 3, H, W), BGR, 0..255 (no /255);
        ``memory_format`` as in ``ImagePreprocess.to_tensor``."""
        import torch

        # the reversed channel view is copied by ascontiguousarray, so torch owns the memory
        arrays = np.ascontiguousarray(np.asarray(arrays)[..., ::-1])
        batch = torch.from_numpy(arrays).permute(0, 3, 1, 2)
        return batch.to(torch.float32).contiguous(
            memory_format=memory_format or torch.contiguous_format
        )

    def __call__(self, image):
        """PIL image (RGB) -> float tensor (3, H, W) in BGR, 0..255: the whole CPU-side pipeline."""
        return self.to_tensor(self.to_array(image)[None])[0]
