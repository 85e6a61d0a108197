"""CPU throughput of the decode stage alone (ResMem preprocessing), in images/s per core.

Measures ``memscore.decode.DecodeImages`` -- read the file, decode with Pillow, EXIF, RGB, the
ResMem resize 256x256 + centre crop 227 to uint8 -- in one process on one thread
(``io_threads=1``), which is what one Ray decode task does on one core. Inputs:

* the real images of ``examples/images`` and ``tests/data/images`` (0.01-0.9 megapixels), and
* JPEGs of typical photo sizes, 1, 2, 3 and 4 megapixels (4:3), made from those images with
  Pillow (Lanczos resize, light noise so they compress like photos rather than like smooth
  upscales, quality 90, 4:2:0), decoded once with draft mode as memscore runs by default
  (``--jpeg-draft-factor 4``) and once with it off (every pixel decoded).

Files are read from the page cache, so S3 fetch time is not included. Each set is timed
``--repeats`` times, in CPU seconds of this process and in wall seconds. The figure is images per
CPU second of the fastest run: on a machine whose cores are shared with other work, the wall
time counts the time other processes held the core, the CPU time does not (what stays is the
slowdown from shared caches). The wall-clock rate of the fastest run is reported beside it.

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
MEGAPIXELS = (1, 2, 3, 4)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48,
                        help="images per timed run of each set, cycling through its files (default 48)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per set; the fastest is reported (default 5)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "DECODE_RESULTS.md"),
                        help="Markdown file the results are written to")
    return parser.parse_args(argv)


def real_images() -> list[Path]:
    """The bundled images Pillow can open (the unreadable TIFF and the READMEs left out)."""
    from PIL import Image

    found = []
    for folder in REAL_DIRS:
        for path in sorted(folder.iterdir()):
            try:
                with Image.open(path) as image:
                    image.size
            except Exception:
                continue
            found.append(path)
    return found


def make_photos(sources: list[Path], workdir: Path) -> dict[int, list[Path]]:
    """JPEGs of each size in MEGAPIXELS from every source at least 100 pixels on a side."""
    from PIL import Image

    rng = np.random.default_rng(0)
    made: dict[int, list[Path]] = {mp: [] for mp in MEGAPIXELS}
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
            out = workdir / f"{source.stem}_{mp}mp.jpg"
            Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(
                out, "JPEG", quality=90, subsampling="4:2:0")
            made[mp].append(out)
    return made


def time_set(paths: list[Path], rows: int, repeats: int, draft_factor: int) -> dict:
    """Seconds per run of DecodeImages over ``rows`` rows cycling through ``paths``."""
    import pyarrow as pa

    from memscore.decode import DecodeImages
    from memscore.models import get_model_weights

    preprocess = {"resmem": get_model_weights("resmem").DEFAULT.transforms}
    stage = DecodeImages("path", preprocess, io_threads=1, draft_factor=draft_factor)
    table = pa.table({"path": [str(paths[i % len(paths)]) for i in range(rows)]})
    out = stage(table)  # warm-up: imports, page cache, Pillow's plugin registry
    errors = [e for e in out.column("memscore_error").to_pylist() if e]
    if errors:
        raise SystemExit(f"decode errors in the benchmark set: {errors[:3]}")
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        stage(table)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    sizes = [p.stat().st_size for p in paths]
    return {"cpu": min(cpu), "cpu_median": statistics.median(cpu), "wall": min(wall),
            "rows": rows, "files": len(paths), "mean_kb": sum(sizes) / len(sizes) / 1024}


def main(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    import PIL
    from PIL import features

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="memscore-decode-bench-"))
    try:
        real = real_images()
        photos = make_photos(real, workdir)
        sets = [("bundled real images", "0.01-0.9", real, 4)]
        for mp in MEGAPIXELS:
            sets.append((f"{mp} MP JPEG, draft on (default)", str(mp), photos[mp], 4))
            sets.append((f"{mp} MP JPEG, draft off", str(mp), photos[mp], 0))
        results = []
        for name, megapixels, paths, draft in sets:
            r = time_set(paths, args.rows, args.repeats, draft)
            results.append((name, megapixels, draft, r))
            print(f"{name}: {r['rows'] / r['cpu']:.1f} images per CPU second, "
                  f"{r['rows'] / r['wall']:.1f} images/s wall", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()

    # The headline: an equal mix of 1, 2, 3 and 4 MP photos, decoded as memscore does by default.
    mix = [r for name, _, draft, r in results if draft and "MP JPEG" in name]
    mix_rate = sum(r["rows"] for r in mix) / sum(r["cpu"] for r in mix)
    mix_median = sum(r["rows"] for r in mix) / sum(r["cpu_median"] for r in mix)
    mix_wall = sum(r["rows"] for r in mix) / sum(r["wall"] for r in mix)

    lines = [
        "# Decode stage benchmark (ResMem preprocessing, one core)",
        "",
        f"Written by `python benchmarks/decode_cpu.py --rows {args.rows} --repeats {args.repeats}`.",
        "",
        f"- Machine: {machine()}",
        f"- Pillow {PIL.__version__}, libjpeg-turbo {features.version('jpg')} "
        f"({'turbo' if features.check_feature('libjpeg_turbo') else 'not turbo'}); "
        "`DecodeImages(io_threads=1)`: one thread, one process, files in the page cache "
        "(no S3 fetch)",
        f"- Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load_after)}, on {cores()} cores: the cores "
        "were shared with other work. So the figure is images per CPU second of this process "
        f"(fastest of {args.repeats} runs), which leaves out the time others held the core; "
        "the wall-clock rate of the fastest run is beside it, for reference only.",
        "- Generated photos: each bundled image at least 100 px on a side, Lanczos-resized to "
        "4:3 at 1-4 MP, Gaussian noise (sigma 3 grey levels), JPEG quality 90, 4:2:0.",
        "",
        "| set | files | mean file size | draft mode | images per CPU second | ms CPU per image | median run, images per CPU second | wall images/s (shared cores) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, _, draft, r in results:
        lines.append(
            f"| {name} | {r['files']} | {r['mean_kb']:.0f} KB | {'on' if draft else 'off'} | "
            f"{r['rows'] / r['cpu']:.1f} | {1000 * r['cpu'] / r['rows']:.1f} | "
            f"{r['rows'] / r['cpu_median']:.1f} | {r['rows'] / r['wall']:.1f} |")
    lines += [
        "",
        f"**Equal mix of 1-4 MP JPEGs, as memscore decodes them by default: {mix_rate:.0f} "
        f"images per CPU second, i.e. per core ({1000 / mix_rate:.1f} ms per image; median "
        f"runs {mix_median:.0f}; wall clock on the shared cores {mix_wall:.0f}).** "
        "This is the figure `docs/scaling.md` uses.",
        "",
        "Draft mode applies to JPEGs at least 4 x 256 = 1024 px on both sides, so the 1 MP "
        "photos (1155x866) decode in full either way (their two rows differ only by noise), "
        "and the 2-4 MP ones at half scale.",
        "",
    ]
    Path(args.results).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_args())
