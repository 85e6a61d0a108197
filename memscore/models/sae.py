"""The sparse autoencoder of Takmaz et al. (2025) and its loss as a memorability score.

The paper trains, on one vision encoder's image representations (``encoders.representation``:
CLIP's and DINOv2's last-layer CLS token, SigLIP2's pooled features), z-scored per dimension
over the training images, a one-layer autoencoder ``Linear(d, 100) -> ReLU -> Linear(100, d)``
with the loss ``MSE(reduction="sum") + 1e-5 * |fc1 output before the ReLU|.sum()``; how badly it
reconstructs an image's representation follows human memorability (Spearman about 0.55 on
MemCat). ``memscore train-sae`` trains one (``memscore.train_sae.job``); ``--model clip-sae`` (and
``dinov2-sae``, ``siglip2-sae``) scores with it: ``<encoder>_sae_loss``, the summed squared
reconstruction error over the d dimensions of the z-scored representation, which is what the
autoencoder was trained to reconstruct. (The paper's training script measured its correlations
on the raw, un-normalised vectors instead; see docs/traces.md.)

A checkpoint (``memscore.models.checkpoint``'s folder) holds ``fc1.weight``, ``fc1.bias``,
``fc2.weight``, ``fc2.bias`` and the z-score statistics ``mean`` and ``std``; its
``memscore.json`` names the encoder and the encoder's weights the representations came from.

Example:
    >>> import torch
    >>> sae = SparseAutoencoder(dim=8, latents=3)
    >>> sae.reconstruction_error(torch.randn(5, 8)).shape
    torch.Size([5])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from memscore.models._api import FolderWeights
from memscore.models.registry import register_model
from memscore.models.weights import CLIPSAE_Weights, DINOv2SAE_Weights, SigLIP2SAE_Weights

__all__ = [
    "SparseAutoencoder",
    "EncoderSAE",
    "STD_EPS",
    "DEFAULT_LATENTS",
    "DEFAULT_L1",
    "training_loss",
    "TENSOR_KEYS",
    "save_sae_checkpoint",
    "load_sae",
    "clip_sae",
    "dinov2_sae",
    "siglip2_sae",
    "CLIPSAE_Weights",
    "DINOv2SAE_Weights",
    "SigLIP2SAE_Weights",
]

#: Added to the standard deviation when z-scoring, as the paper does: ``(x - mean) / (std +
#: 1e-8)`` (a dimension constant over the training images gives 0, not a division by zero).
STD_EPS = 1e-8
DEFAULT_LATENTS = 100  # the paper's hidden size
DEFAULT_L1 = 1e-5  # the paper's sparsity weight
#: What a checkpoint's model.safetensors holds, no more and no less (strict loading).
TENSOR_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "mean", "std")


class SparseAutoencoder(nn.Module):
    """``Linear(dim, latents) -> ReLU -> Linear(latents, dim)`` over z-scored vectors.

    ``mean`` and ``std`` (buffers, saved with the weights) are the training images' per-dimension
    statistics; ``normalise`` applies them. ``forward`` takes vectors already normalised and
    returns ``(reconstruction, fc1 output before the ReLU)``, the two terms of the paper's loss.

    Args:
        dim: the representation's size d (768 for the three Base-size encoders).
        latents: the hidden layer's size (the paper's 100).
    """

    def __init__(self, dim: int, latents: int = DEFAULT_LATENTS) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, latents)
        self.fc2 = nn.Linear(latents, dim)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / (std + 1e-8)``, per dimension."""
        return (x - self.mean) / (self.std + STD_EPS)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.fc1(z)
        return self.fc2(torch.relu(encoded)), encoded

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """Raw representations ``[N, d]`` -> ``[N]``: the summed squared error between the
        z-scored vector and its reconstruction (the loss's reconstruction term, per image)."""
        z = self.normalise(x)
        decoded, _ = self(z)
        return (decoded - z).pow(2).sum(-1)


def training_loss(
    sae: SparseAutoencoder, z: torch.Tensor, l1: float = DEFAULT_L1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's loss on a batch of z-scored vectors: ``MSE(reduction="sum") + l1 *
    |fc1 output|.sum()``; returns ``(loss, its reconstruction term)``, both summed over the
    batch."""
    decoded, encoded = sae(z)
    reconstruction = nn.functional.mse_loss(decoded, z, reduction="sum")
    return reconstruction + l1 * encoded.abs().sum(), reconstruction


class EncoderSAE(nn.Module):
    """Pixels -> the encoder's representation -> the autoencoder's reconstruction error.

    Args:
        encoder: ``clip``, ``dinov2`` or ``siglip2``.
        model: the transformers encoder (``encoders.load_encoder``).
        sae: the trained autoencoder, with its ``mean`` and ``std``.

    ``forward(pixel_values [N, 3, H, W]) -> [N]`` float32. The autoencoder runs in float32 even
    where the encoder runs under ``--precision bf16``/``fp16`` autocast.
    """

    def __init__(self, encoder: str, model: nn.Module, sae: SparseAutoencoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.model = model
        self.sae = sae

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from memscore.models.encoders import representation

        vectors = representation(self.encoder, self.model, pixel_values)
        with torch.autocast(pixel_values.device.type, enabled=False):
            return self.sae.reconstruction_error(vectors.float())


def save_sae_checkpoint(
    folder: str,
    sae: SparseAutoencoder,
    *,
    encoder: str,
    encoder_weights: str,
    info: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``sae`` as the memscore checkpoint ``--model <encoder>-sae --weights FOLDER``
    scores with: ``model.safetensors`` (``TENSOR_KEYS``) and ``memscore.json``, which names the
    encoder and ``encoder_weights`` (the Hugging Face id or folder the representations came
    from), plus ``info``."""
    from memscore.models.checkpoint import save_checkpoint

    record = {
        **(info or {}),
        "model": f"{encoder}-sae",
        "weights": "train-sae",
        "output_column": f"{encoder}_sae_loss",
        "encoder": encoder,
        "encoder_weights": encoder_weights,
        "representation_dim": sae.fc1.in_features,
        "latents": sae.fc1.out_features,
    }
    return save_checkpoint(folder, sae.state_dict(), record, storage_options)


def load_sae(folder: str, storage_options: Mapping[str, Any] | None = None) -> SparseAutoencoder:
    """The autoencoder of a checkpoint folder (or its model file), loaded strictly: exactly
    ``TENSOR_KEYS``, shapes that fit together."""
    from memscore.models._api import CheckpointKeyError, load_state_dict_file

    tensors = load_state_dict_file(folder, storage_options)
    missing = [k for k in TENSOR_KEYS if k not in tensors]
    extra = sorted(set(tensors) - set(TENSOR_KEYS))
    if missing or extra:
        raise CheckpointKeyError(
            f"{folder}: not an autoencoder checkpoint (missing: "
            f"{', '.join(missing) or 'none'}; unexpected: "
            f"{', '.join(extra[:5]) or 'none'})"
        )
    latents, dim = tensors["fc1.weight"].shape
    sae = SparseAutoencoder(dim, latents)
    try:
        sae.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # shapes that do not fit together
        raise CheckpointKeyError(f"{folder}: {str(exc).splitlines()[-1].strip()}") from None
    return sae.eval()


def _sae_model(
    encoder: str, weights: FolderWeights | None, storage_options: Mapping[str, Any] | None
) -> EncoderSAE:
    from memscore.models.checkpoint import read_checkpoint_info
    from memscore.models.encoders import load_encoder, random_encoder

    if weights is None:  # the Base-size encoder and an autoencoder, both randomly initialised
        model = random_encoder(encoder)
        return EncoderSAE(encoder, model, SparseAutoencoder(model.config.hidden_size))
    info = read_checkpoint_info(weights.folder, storage_options) or {}
    sae = load_sae(weights.folder, storage_options)
    model, _ = load_encoder(encoder, info["encoder_weights"], storage_options)
    if model.config.hidden_size != sae.fc1.in_features:
        raise ValueError(
            f"--weights {weights.folder}: the autoencoder reads "
            f"{sae.fc1.in_features}-d vectors, the encoder "
            f"{info['encoder_weights']} gives {model.config.hidden_size}"
        )
    return EncoderSAE(encoder, model, sae)


@register_model("clip-sae", CLIPSAE_Weights)
def clip_sae(
    *, weights: FolderWeights | None = None, storage_options: Mapping[str, Any] | None = None
) -> EncoderSAE:
    """CLIP ViT-B/32 and an autoencoder over its CLS token; ``weights`` from
    ``weights_for("clip-sae", "runs/NAME/best")`` (None: both randomly initialised)."""
    return _sae_model("clip", weights, storage_options)


@register_model("dinov2-sae", DINOv2SAE_Weights)
def dinov2_sae(
    *, weights: FolderWeights | None = None, storage_options: Mapping[str, Any] | None = None
) -> EncoderSAE:
    """DINOv2-base and an autoencoder over its CLS token; ``weights`` as for ``clip_sae``."""
    return _sae_model("dinov2", weights, storage_options)


@register_model("siglip2-sae", SigLIP2SAE_Weights)
def siglip2_sae(
    *, weights: FolderWeights | None = None, storage_options: Mapping[str, Any] | None = None
) -> EncoderSAE:
    """SigLIP2 and an autoencoder over its pooled features; ``weights`` as for ``clip_sae``."""
    return _sae_model("siglip2", weights, storage_options)
