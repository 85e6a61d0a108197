"""What ``memscore features`` costs beside ``memscore score``, and what a rendering costs.

1. **Extraction vs scoring**, side by side in one run on the same images: ``memscore score``
   and ``memscore features`` (its activations pass: the scoring run with forward hooks on the
   layers) over ``--rows`` rows cycling through the real photos in examples/images, each
   command run ``--repeats`` times alternately; the rate is each run's own ``images_per_s``
   (its summary: rows over the pipeline's wall time, Ray's start excluded). The issue's bar:
   features at least 0.9x scoring's images/s.
2. **Renderings**: seconds per channel (``render_channels``, a batch of 8 channels, the
   published ResMem on this machine's CPU or a GPU) at ``--steps`` steps, for an early layer of
   the AlexNet-style branch and for layers of the ResNet; 512 steps (the default) cost
   ``512 / steps`` times that.

Writes ``FEATURES_RESULTS.md`` beside this script (``--results`` for another file).

    python benchmarks/features.py                          # ~15 minutes on 2 cores
    python benchmarks/features.py --rows 60 --steps 16     # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LAYERS = "conv4,features.layer4.2"
RENDER_LAYERS = ("conv4", "features.layer2.0.conv2", "features.layer3.14.conv2")


def _run(command: list[str]) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done


def extraction(rows: int, repeats: int) -> list[dict]:
    images = sorted((ROOT / "examples" / "images").glob("*.[pj][np]g"))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        manifest = Path(scratch) / "manifest.csv"
        manifest.write_text("path\n" + "".join(f"{images[i % len(images)]}\n" for i in range(rows)))
        for repeat in range(repeats):
            for job in ("score", "features"):
                out = Path(scratch) / f"{job}{repeat}"
                command = [
                    sys.executable,
                    "-m",
                    "memscore.cli",
                    job,
                    str(manifest),
                    "--output",
                    str(out),
                    "--quiet",
                ]
                if job == "features":
                    command += ["--layers", LAYERS]
                clock = time.perf_counter()
                _run(command)
                wall = time.perf_counter() - clock
                summary_file = out / ("activations" if job == "features" else "") / "_memscore.json"
                summary = json.loads(summary_file.read_text())
                results.append(
                    {
                        "job": job,
                        "repeat": repeat,
                        "images_per_s": summary["images_per_s"],
                        "command_s": round(wall, 1),
                    }
                )
                print(results[-1], flush=True)
    return results


def renderings(steps: int) -> list[dict]:
    import torch

    from memscore.feature_analysis.render import render_channels
    from memscore.models import get_model

    model = get_model("resmem")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    results = []
    for layer in RENDER_LAYERS:
        clock = time.perf_counter()
        render_channels(model, layer, list(range(8)), size=(227, 227), steps=steps)
        seconds = (time.perf_counter() - clock) / 8
        results.append(
            {
                "layer": layer,
                "steps": steps,
                "device": device,
                "seconds_per_channel": round(seconds, 2),
                "seconds_per_channel_at_512_steps": round(seconds * 512 / steps, 1),
            }
        )
        print(results[-1], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--results", default=str(HERE / "FEATURES_RESULTS.md"))
    args = parser.parse_args()
    rates = extraction(args.rows, args.repeats)
    renders = renderings(args.steps)
    score = [r["images_per_s"] for r in rates if r["job"] == "score"]
    feats = [r["images_per_s"] for r in rates if r["job"] == "features"]
    ratio = (sum(feats) / len(feats)) / (sum(score) / len(score))
    lines = [
        "# memscore features: cost beside memscore score, and renderings",
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}. Command: "
        f"`python benchmarks/features.py --rows {args.rows} --repeats {args.repeats} "
        f"--steps {args.steps}`",
        "",
        f"## Extraction vs scoring ({args.rows} rows, layers {LAYERS}, alternating runs)",
        "",
        "| job | repeat | images/s (pipeline) | command s |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['job']} | {r['repeat']} | {r['images_per_s']} | {r['command_s']} |"
            for r in rates
        ),
        "",
        f"features / score images/s: **{ratio:.2f}x** (mean of each job's runs).",
        "",
        "## Renderings (published ResMem, 8 channels per batch)",
        "",
        "| layer | device | steps | s per channel | s per channel at 512 steps |",
        "|---|---|---:|---:|---:|",
        *(
            f"| {r['layer']} | {r['device']} | {r['steps']} | {r['seconds_per_channel']} | "
            f"{r['seconds_per_channel_at_512_steps']} |"
            for r in renders
        ),
        "",
    ]
    Path(args.results).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
