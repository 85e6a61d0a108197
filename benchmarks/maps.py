"""Which memorability-map method is faithful, and what each costs (issue 29): the table behind
``memscore score --maps``' default.

On real photos (the repository's 8: examples/images and tests/data/images, each also mirrored:
16 images, or ``--images``), with the published ResMem, for each method:

- **faithfulness**, by the deletion test of RISE (``memscore.saliency.deletion``): the score's
  mean fall when the 20% of cells the map ranks highest are grey, beside the mean fall when
  as many random cells are (5 draws); the share of images where the map's cells beat random;
  and the deletion curve's AUC (lower: the score falls sooner);
- **cost** per image as a multiple of a plain forward pass (``--batch`` images at once, the
  same batches, side by side in one run on this machine).

Methods: Grad-CAM over both branches (``features.layer4`` + ``conv5``, memscore's combined
form), over each branch alone, occlusion, RISE and integrated gradients; a random map as the
floor. Writes ``MAPS_RESULTS.md`` beside this script (``--results`` for another file).

    python benchmarks/maps.py             # about 35 minutes on 2 cores
    python benchmarks/maps.py --quick     # 4 images, cheap settings: a check that it runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZE = 16


def photos(count: int):
    from PIL import Image, ImageOps

    sources = sorted((ROOT / "examples" / "images").glob("*.[pj][np]g")) + [
        ROOT / "tests" / "data" / "images" / name
        for name in ("coins.png", "hubble_deep_field.jpg", "logo.png")
    ]
    images = [(path.name, Image.open(path).convert("RGB")) for path in sources]
    images += [(f"{name} mirrored", ImageOps.mirror(image)) for name, image in images]
    return images[:count]


def methods(quick: bool):
    from memscore.saliency.methods import gradcam, integrated_gradients, occlusion, rise

    both = ("features.layer4", "conv5")
    occlusion_cells = 4 if quick else 8
    masks = 16 if quick else 128
    steps = 2 if quick else 16
    return {
        "gradcam (layer4 + conv5)": (
            lambda m, s, x: gradcam(m, x, SIZE, both),
            "1 forward, backward through the head",
        ),
        "gradcam (layer4 only)": (
            lambda m, s, x: gradcam(m, x, SIZE, both[:1]),
            "1 forward, backward through the head",
        ),
        "gradcam (conv5 only)": (
            lambda m, s, x: gradcam(m, x, SIZE, both[1:]),
            "1 forward, backward through the head",
        ),
        f"occlusion ({occlusion_cells}x{occlusion_cells} cells)": (
            lambda m, s, x: _upsampled(occlusion(s, x, occlusion_cells)),
            f"{occlusion_cells**2 + 1} forwards",
        ),
        f"rise ({masks} masks)": (
            lambda m, s, x: rise(s, x, SIZE, masks=masks),
            f"{masks + 1} forwards",
        ),
        f"integrated gradients ({steps} steps)": (
            lambda m, s, x: integrated_gradients(m, x, SIZE, steps=steps),
            f"{steps} forwards and full backwards",
        ),
        "random map (floor)": (lambda m, s, x: _random(s, x), "none"),
    }


def _upsampled(result):
    import torch.nn.functional as F

    base, maps = result
    return base, F.interpolate(maps[:, None], size=(SIZE, SIZE), mode="nearest")[:, 0]


def _random(score, x):
    import torch

    generator = torch.Generator().manual_seed(1)
    return score(x), torch.rand(x.shape[0], SIZE, SIZE, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results", type=Path, default=HERE / "MAPS_RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.images = min(args.images, 4)

    import torch

    from memscore.models import get_model, get_model_weights
    from memscore.saliency.deletion import deletion_test

    torch.manual_seed(0)
    model = get_model("resmem")
    preprocess = get_model_weights("resmem").DEFAULT.transforms
    named = photos(args.images)
    x = preprocess.to_tensor(np.stack([preprocess.to_array(image) for _, image in named]))
    batches = [x[i : i + args.batch] for i in range(0, len(x), args.batch)]

    def score(batch):
        with torch.inference_mode():
            return model(batch)

    clock = time.perf_counter()
    for batch in batches:
        score(batch)
    forward_s = (time.perf_counter() - clock) / len(x)

    rows = []
    for name, (method, work) in methods(args.quick).items():
        clock = time.perf_counter()
        maps = []
        for batch in batches:
            with torch.inference_mode():
                _, m = method(model, score, batch)
            maps.append(m)
        seconds = (time.perf_counter() - clock) / len(x)
        maps = torch.cat(maps).float()
        tests = deletion_test(score, x, maps.numpy())
        top = np.array([t.top_fall for t in tests])
        random = np.array([t.random_fall for t in tests])
        rows.append(
            {
                "method": name,
                "work": work,
                "top": float(top.mean()),
                "random": float(random.mean()),
                "wins": int((top > random).sum()),
                "auc": float(np.mean([t.auc for t in tests])),
                "cost": seconds / forward_s,
                "seconds": seconds,
            }
        )
        print(
            f"{name}: top {top.mean():+.4f} random {random.mean():+.4f} "
            f"cost {seconds / forward_s:.2f}x",
            flush=True,
        )

    lines = [
        "# Memorability maps: faithfulness and cost (benchmarks/maps.py)",
        "",
        f"{dt.date.today().isoformat()}, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} torch threads, published ResMem, {len(x)} photos "
        f"({', '.join(n for n, _ in named)}), maps of {SIZE}x{SIZE} cells over the 227x227 "
        f"crop, batches of {args.batch}."
        + (" **--quick: cheap settings, not the figures.**" if args.quick else ""),
        "",
        f"A plain forward pass: {forward_s:.3f} s per image. Deletion test: grey (0.5) the 20% "
        "of cells (51 of 256) the map ranks highest; the score's fall, beside the mean fall "
        "over 5 random sets of as many cells; 'beats random' counts the images where the map's "
        "cells fell more. AUC: the mean score along the deletion curve (11 points, none to all "
        "cells greyed in the map's order); lower is more faithful.",
        "",
        "| method | work per batch | fall, map's top 20% | fall, random 20% | beats random | deletion AUC | cost (x forward) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['work']} | {r['top']:+.4f} | {r['random']:+.4f} | "
            f"{r['wins']}/{len(x)} | {r['auc']:.4f} | {r['cost']:.2f} |"
        )
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
