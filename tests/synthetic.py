"""Labelled image sets whose label is a known smooth function of the pixels, for training tests.

Each image is a random smooth texture tinted from blue to red by a random amount and scaled to
a random brightness; its label is its warmth, 0.35 + 0.5 * (mean red - mean blue + 1) / 2,
within the range of real memorability scores. A randomly initialised network is close to
linear in its input and ranks these images by some fixed mix of colour and brightness (for
MemNet with seed 0, against the label: Spearman about -0.9); a validation Spearman above 0.8
after training shows that the network learnt which way the label goes and to ignore
brightness.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def tint_label(image: Image.Image) -> float:
    """The label of an image: 0.35 + 0.5 * (mean red - mean blue + 1) / 2 on the 0..1 scale."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return 0.35 + 0.5 * float(pixels[..., 0].mean() - pixels[..., 2].mean() + 1) / 2


def write_tint_dataset(
    folder: Path, n: int, *, seed: int = 0, size: int = 96, extra_rows: list[dict] | None = None
) -> Path:
    """``n`` PNGs in ``folder/images`` and ``folder/labels.csv`` (path, memorability, category);
    ``extra_rows`` are appended to the CSV as they are (bad rows for tests)."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        noise = rng.random((size // 8, size // 8))
        texture = np.asarray(
            Image.fromarray((noise * 255).astype(np.uint8))
            .resize((size, size), Image.BICUBIC)
            .filter(ImageFilter.GaussianBlur(2)),
            dtype=np.float64,
        )
        texture = texture / 255.0
        warmth, brightness = rng.uniform(0, 1), rng.uniform(0.25, 0.85)
        tint = np.array([warmth, 0.5, 1 - warmth])
        pixels = np.clip(texture[..., None] * tint * brightness * 2 * 255, 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8))
        name = f"img_{i:04d}.png"
        image.save(images / name)
        rows.append(
            {
                "path": f"images/{name}",
                "memorability": f"{tint_label(image):.6f}",
                "category": "warm" if warmth >= 0.5 else "cool",
            }
        )
    rows += extra_rows or []
    manifest = folder / "labels.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "memorability", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest
