"""Small seeded random encoders of the paper's three architectures, saved as Hugging Face folders.

Nothing in the tests can download the real weights, so each test builds the architecture from a
``transformers`` config, tiny (2 layers, hidden size 32, 4 heads) but with the paper's input
size and token layout (CLIP ViT-B/32: 224 px, patch 32, 50 tokens; DINOv2: 224 px after the
crop, patch 14, 257 tokens; SigLIP base/16-224: patch 16, 196 tokens, no CLS), seeded, and
``save_pretrained``s it beside the slow (Pillow) image processor of the paper's model folder.
"""

from __future__ import annotations

from pathlib import Path

# The paper's folders' processor settings (their preprocessor_config.json): CLIP's defaults
# (shortest edge 224, crop 224, bicubic, OpenAI mean/std); DINOv2's BitImageProcessor with
# shortest edge 256, crop 224, bicubic and ImageNet mean/std; SigLIP's fixed 224x224. SigLIP here
# resizes bilinearly (resample 2), so the tests cover a second Pillow filter.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
LAYERS = TINY["num_hidden_layers"]
TOKENS = {"clip": 50, "dinov2": 257, "siglip2": 196}


def image_processor(encoder: str):
    """The slow (Pillow backend) image processor of ``encoder``'s paper folder."""
    from transformers import BitImageProcessorPil, CLIPImageProcessorPil, SiglipImageProcessorPil

    if encoder == "clip":
        return CLIPImageProcessorPil()
    if encoder == "dinov2":
        return BitImageProcessorPil(
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
    return SiglipImageProcessorPil(size={"height": 224, "width": 224}, resample=2)


def build_model(encoder: str, *, seed: int = 0, full: bool = False, layers: int = LAYERS):
    """A seeded random model of ``encoder``'s architecture (``full``: CLIP's or SigLIP's whole
    two-tower model, as the paper's hub folders hold it)."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        SiglipConfig,
        SiglipModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    tiny = {**TINY, "num_hidden_layers": layers}
    torch.manual_seed(seed)
    if encoder == "clip":
        vision = dict(tiny, image_size=224, patch_size=32)
        if full:
            return CLIPModel(CLIPConfig(vision_config=vision, text_config=TINY, projection_dim=16))
        return CLIPVisionModel(CLIPVisionConfig(**vision))
    if encoder == "dinov2":
        return Dinov2Model(Dinov2Config(**tiny, image_size=224, patch_size=14))
    vision = dict(tiny, image_size=224, patch_size=16)
    if full:
        return SiglipModel(SiglipConfig(vision_config=vision, text_config=TINY))
    return SiglipVisionModel(SiglipVisionConfig(**vision))


def make_encoder_folder(
    encoder: str, folder: Path, *, seed: int = 0, full: bool = False, layers: int = LAYERS
) -> Path:
    """``build_model(...)`` and its image processor saved into ``folder``; -> ``folder``."""
    folder = Path(folder)
    build_model(encoder, seed=seed, full=full, layers=layers).save_pretrained(folder)
    image_processor(encoder).save_pretrained(folder)
    return folder


def reference_pixels(encoder: str, folder: Path, image):
    """``folder``'s image processor, loaded by transformers with the Pillow backend (the slow
    processor), on one PIL image -> float32 [1, 3, H, W] tensor."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    assert processor.backend == "pil", type(processor)
    return processor(images=image, return_tensors="pt")["pixel_values"]
