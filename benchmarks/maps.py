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

Methods: Grad-CAM over both of ResMem's branches (the ResNet's ``features.layer4`` and the
AlexNet-style ``conv5``, each map scaled to 0..1, summed: memscore's default, chosen by this
table), their raw sum, each alone, occlusion, RISE and integrated gradients; a random map as
the floor. Ties among a map's cells are broken at random in the deletion test. Writes ``MAPS_RESULTS.md`` beside this script (``--results`` for another file).

    python benchmarks/maps.py             # about 35 minutes on 2 cores
    python benchmarks/maps.py --quick     # 4 images, cheap settings: a check that it runs
    python benchmarks/maps.py --cost-rounds 7   # Grad-CAM's cost alone, alternating rounds
    python benchmarks/maps.py --pictures docs/img/maps   # each method's maps of 3 photos
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
        "gradcam (layer4 + conv5, each scaled to 0..1, summed: memscore's default)": (
            lambda m, s, x: gradcam(m, x, SIZE, both),
            "1 forward, backward through the head",
        ),
        "gradcam (layer4 + conv5, raw sum)": (
            lambda m, s, x: gradcam(m, x, SIZE, both, combine="raw"),
            "1 forward, backward through the head",
        ),
        "gradcam (layer4)": (
            lambda m, s, x: gradcam(m, x, SIZE, both[:1]),
            "1 forward, backward through the head",
        ),
        "gradcam (conv5)": (
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


def end_to_end(rows: int, repeats: int) -> list[dict]:
    """``memscore score`` over ``rows`` rows (the example photos, cycled) without and with
    ``--maps``, alternately, each ``repeats`` times: the images/s of each run's own summary."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    images = sorted((ROOT / "examples" / "images").glob("*.[pj][np]g"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        manifest = Path(scratch) / "manifest.csv"
        manifest.write_text("path\n" + "".join(f"{images[i % len(images)]}\n" for i in range(rows)))
        for repeat in range(repeats):
            for maps in (False, True):
                out = Path(scratch) / f"run{repeat}{maps}"
                command = [sys.executable, "-m", "memscore.cli", "score", str(manifest)]
                command += ["--output", str(out), "--quiet"] + (["--maps"] if maps else [])
                done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-3000:])
                summary = json.loads((out / "_memscore.json").read_text())
                results.append({"maps": maps, "images_per_s": summary["images_per_s"]})
                print(results[-1], flush=True)
    return results


def pictures(folder: Path, count: int = 3) -> None:
    """A picture per photo, each method's map side by side over the crop ResMem sees (the
    first ``count`` photos), for docs/maps.md."""
    import torch
    from PIL import Image, ImageDraw

    from memscore.maps.overlay import overlay
    from memscore.models import get_model, get_model_weights

    model = get_model("resmem")
    preprocess = get_model_weights("resmem").DEFAULT.transforms
    named = photos(count)
    x = preprocess.to_tensor(np.stack([preprocess.to_array(image) for _, image in named]))

    def score(batch):
        with torch.inference_mode():
            return model(batch)

    shown = {
        n: m
        for n, m in methods(False).items()
        if "random" not in n and ("default" in n or not n.startswith("gradcam"))
    }
    maps = {}
    for name, (method, _) in shown.items():
        with torch.inference_mode():
            maps[name] = method(model, score, x)[1].float().numpy()
    folder.mkdir(parents=True, exist_ok=True)
    tile, label = 227, 18
    for i, (photo_name, _) in enumerate(named):
        crop = Image.fromarray(preprocess.to_array(named[i][1]))
        sheet = Image.new("RGB", ((len(shown) + 1) * tile, tile + label), "white")
        draw = ImageDraw.Draw(sheet)
        sheet.paste(crop, (0, label))
        draw.text((4, 3), "what ResMem sees", fill=(0, 0, 0))
        for j, name in enumerate(shown, start=1):
            sheet.paste(overlay(crop, maps[name][i], (0, 0, tile, tile)), (j * tile, label))
            draw.text((j * tile + 4, 3), name.split(" (")[0], fill=(0, 0, 0))
        stem = Path(photo_name.split()[0]).stem
        sheet.save(folder / f"methods-{stem}.png")
        print(f"wrote {folder / f'methods-{stem}.png'}", flush=True)


def cost_rounds(rounds: int, count: int, batch: int) -> list[float]:
    """Grad-CAM's cost (over ResMem's declared layer, the default) over a plain forward,
    ``rounds`` times alternately on the same batches: the per-round ratios (one round of a few
    seconds is at the mercy of this machine's drift)."""
    import torch

    from memscore.models import get_model, get_model_weights
    from memscore.saliency.methods import gradcam

    model = get_model("resmem")
    preprocess = get_model_weights("resmem").DEFAULT.transforms
    layers = get_model_weights("resmem").DEFAULT.meta["map_layers"]
    named = photos(count)
    x = preprocess.to_tensor(np.stack([preprocess.to_array(image) for _, image in named]))
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]

    def timed(fn) -> float:
        clock = time.perf_counter()
        for b in batches:
            with torch.inference_mode():
                fn(b)
        return time.perf_counter() - clock

    timed(model)  # warm-up
    timed(lambda b: gradcam(model, b, SIZE, layers))
    ratios = []
    for _ in range(rounds):
        plain = timed(model)
        mapped = timed(lambda b: gradcam(model, b, SIZE, layers))
        ratios.append(mapped / plain)
        print(f"gradcam / forward: {ratios[-1]:.3f}", flush=True)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=60, help="rows of the end-to-end runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--pictures", type=Path, help="only draw each method's maps of 3 photos into this folder"
    )
    parser.add_argument(
        "--cost-rounds",
        type=int,
        metavar="N",
        help="only time Grad-CAM against a plain forward, N rounds alternately, and add the "
        "figures to --results",
    )
    parser.add_argument("--results", type=Path, default=HERE / "MAPS_RESULTS.md")
    parser.add_argument(
        "--only", help="the methods whose name contains this text (and no end-to-end runs)"
    )
    args = parser.parse_args()
    if args.pictures:
        pictures(args.pictures)
        return
    if args.cost_rounds:
        from memscore.models import get_model_weights

        ratios = cost_rounds(args.cost_rounds, args.images, args.batch)
        layers = " + ".join(get_model_weights("resmem").DEFAULT.meta["map_layers"])
        text = args.results.read_text() if args.results.exists() else ""
        text += (
            f"\nGrad-CAM ({layers}) over a plain forward, {args.cost_rounds} rounds "
            f"alternately on the same {args.images} photos in batches of {args.batch} "
            f"(`--cost-rounds`): median {np.median(ratios):.2f}x, range "
            f"{min(ratios):.2f}-{max(ratios):.2f}x.\n"
        )
        args.results.write_text(text)
        return
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

    def forward_seconds() -> float:
        """Seconds per image of a plain forward pass over the same batches."""
        clock = time.perf_counter()
        for batch in batches:
            score(batch)
        return (time.perf_counter() - clock) / len(x)

    forward_seconds()  # warm-up: the first passes allocate; not a fair baseline
    forwards = []
    rows = []
    for name, (method, work) in methods(args.quick).items():
        if args.only and args.only not in name:
            continue
        # the baseline measured just before each method: the machine's speed drifts
        forward_s = forward_seconds()
        forwards.append(forward_s)
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
        f"A plain forward pass: {min(forwards):.3f}-{max(forwards):.3f} s per image (measured "
        "again before each method, after a warm-up; each cost is over the one just before it). "
        "Deletion test: grey (0.5) the 20% "
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
    if args.only:
        args.results.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.results}")
        return
    runs = end_to_end(8 if args.quick else args.rows, 1 if args.quick else args.repeats)
    plain = [r["images_per_s"] for r in runs if not r["maps"]]
    mapped = [r["images_per_s"] for r in runs if r["maps"]]
    lines += [
        "",
        f"End to end, `memscore score` over {8 if args.quick else args.rows} rows (the example "
        "photos, cycled), without and with `--maps` (Grad-CAM, 16x16), alternately, images/s "
        "from each run's summary:",
        "",
        "| run | images/s |",
        "|---|---:|",
        *(f"| {'--maps' if r['maps'] else 'plain'} | {r['images_per_s']:.2f} |" for r in runs),
        "",
        f"Mean ratio, with maps over without: {np.mean(mapped) / np.mean(plain):.2f}.",
    ]
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
