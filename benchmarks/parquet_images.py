"""Memory of reading images inside Parquet (memscore.sources.parquet_images), by row size.

Two files, written as img2dataset writes its Parquet output (``pq.ParquetWriter``, a table of
100 rows at a time, so row groups of 100 rows, the image bytes in a binary ``jpg`` column beside
its metadata columns):

- **big rows**: 12 MP JPEGs (4032x3024, made from the real photos in examples/images: scaled
  up, shifted, with a little noise so they compress like phone photos, and each file made
  distinct by a trailer after its end marker, which decoders ignore), ``--big-gb`` GB in all
  (default 2);
- **many small rows**: ``--small-rows`` thumbnails (256x256 JPEGs as img2dataset's default
  resize makes them, about 10 kB each; default 100,000).

For each, in a fresh process each: (1) a read task's work, ``read_plan`` over every planned
read of the file one after the other, holding one block at a time, at the default block size
(``DEFAULT_BLOCK_BYTES``, 64 MiB) and at 16 MiB: peak RSS above the process's baseline, the
largest block's bytes, blocks and seconds; (2) the decode stage (``DecodeImages``, exact decode,
8 I/O threads, the default pixel budget) on one block of ``--rows-per-block`` rows as the run's
decode tasks get them: peak RSS above baseline. Peak RSS is the kernel's ``VmHWM``.

Writes ``PARQUET_IMAGES_RESULTS.md`` beside this script (``--results`` for another file).

    python benchmarks/parquet_images.py                         # ~10 minutes on 2 cores
    python benchmarks/parquet_images.py --big-gb 0.5 --small-rows 20000   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SCHEMA_FIELDS = [
    ("url", "string"),
    ("caption", "string"),
    ("key", "string"),
    ("status", "string"),
    ("error_message", "string"),
    ("width", "int64"),
    ("height", "int64"),
    ("original_width", "int64"),
    ("original_height", "int64"),
    ("exif", "string"),
    ("sha256", "string"),
    ("jpg", "binary"),
]


def _photos(size: tuple[int, int], count: int) -> list[bytes]:
    """``count`` distinct JPEGs of ``size`` made from the real example photos."""
    from PIL import Image

    sources = sorted(p for p in (ROOT / "examples" / "images").iterdir() if p.suffix == ".jpg")
    sources += sorted(p for p in (ROOT / "examples" / "images").iterdir() if p.suffix == ".png")
    out = []
    for i in range(count):
        image = Image.open(sources[i % len(sources)]).convert("RGB").resize(size)
        shift = (i * 37) % max(1, size[0] // 4)
        image = image.crop((shift, 0, size[0], size[1])).resize(size)
        if size[0] > 1000:  # a phone photo's sensor noise: JPEGs of 3-4 MB, not 1 MB of upscale
            import numpy as np

            noise = np.random.default_rng(i).integers(-12, 13, (size[1], size[0], 3))
            pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_img2dataset_file(path: Path, images: list[bytes], rows: int) -> int:
    """One img2dataset-style shard of ``rows`` rows cycling over ``images``, each cell made
    distinct by a trailer after the JPEG's end marker; -> bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in SCHEMA_FIELDS])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 100):  # img2dataset's BufferedParquetWriter: 100 rows
            batch = []
            for i in range(start, min(rows, start + 100)):
                batch.append(
                    {
                        "url": f"https://example.org/{i}.jpg",
                        "caption": f"photo {i}",
                        "key": f"{i:09d}",
                        "status": "success",
                        "error_message": None,
                        "width": 0,
                        "height": 0,
                        "original_width": 0,
                        "original_height": 0,
                        "exif": None,
                        "sha256": None,
                        "jpg": images[i % len(images)] + f"memscore-{i:012d}".encode(),
                    }
                )
            writer.write_table(pa.Table.from_pylist(batch, schema))
    return path.stat().st_size


# ------------------------------------------------------------------ measured in fresh processes
_READ = r"""
import json, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
from memscore.sources.manifest import open_manifest
from memscore.sources.parquet_images import plan_reads, read_plan
source = open_manifest(sys.argv[1], rows_in_driver=False)
footers = source.footers()
base = hwm()
block = int(sys.argv[2])
clock = time.perf_counter()
plans = plan_reads(footers, list(source.files), source.row_counts(), block)
largest = blocks = rows = 0
schema = footers[0].schema.to_arrow_schema()
for plan in plans:
    for table in read_plan(plan, {}, image_column="jpg", keep_image_column=False, schema=schema,
                           base_dir=source.base_dir):
        largest = max(largest, table.nbytes)
        blocks += 1
        rows += table.num_rows
        del table
from memscore.sources.parquet_images import read_task_memory
group = max(footers[0].row_group(g).total_byte_size for g in range(footers[0].num_row_groups))
print(json.dumps({"baseline": base, "peak": hwm(), "largest_block": largest, "blocks": blocks,
                  "rows": rows, "plans": len(plans), "seconds": time.perf_counter() - clock,
                  "row_group": group, "reserved": read_task_memory(footers, plans, block)}))
"""

_DECODE = r"""
import json, sys
import pyarrow as pa
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
from memscore.models import get_model_weights
from memscore.sources.manifest import open_manifest
from memscore.sources.parquet_images import plan_reads, read_plan
from memscore.stages.decode import DecodeImages
source = open_manifest(sys.argv[1], rows_in_driver=False)
rows = int(sys.argv[2])
footers = source.footers()
plans = plan_reads(footers, list(source.files), source.row_counts(rows))
schema = footers[0].schema.to_arrow_schema()
tables = [t for p in plans for t in read_plan(p, {}, image_column="jpg", keep_image_column=False,
          schema=schema, base_dir=source.base_dir)]
block = pa.concat_tables(tables)
decode = DecodeImages("jpg", {"resmem": get_model_weights("resmem").DEFAULT.transforms},
                      bytes_column="__memscore_image", io_threads=8)
base = hwm()
out = decode(block)
errors = out.column("memscore_error").null_count
print(json.dumps({"baseline": base, "peak": hwm(), "block_bytes": block.nbytes,
                  "rows": block.num_rows, "decoded": errors}))
"""


def measure(script: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-gb", type=float, default=2.0)
    parser.add_argument("--small-rows", type=int, default=100_000)
    parser.add_argument("--rows-per-block", default="16,256", help="big,small decode blocks")
    parser.add_argument("--work", default="/tmp/memscore-parquet-images-bench")
    parser.add_argument("--results", default=str(HERE / "PARQUET_IMAGES_RESULTS.md"))
    args = parser.parse_args(argv)
    big_block, small_block = (int(x) for x in args.rows_per_block.split(","))
    work = Path(args.work)
    (work / "big").mkdir(parents=True, exist_ok=True)
    (work / "small").mkdir(parents=True, exist_ok=True)

    clock = time.perf_counter()
    big_images = _photos((4032, 3024), 24)
    per = sum(map(len, big_images)) / len(big_images)
    big_rows = int(args.big_gb * 1e9 / per)
    big_size = write_img2dataset_file(work / "big" / "00000.parquet", big_images, big_rows)
    small_images = _photos((256, 256), 200)
    small_size = write_img2dataset_file(
        work / "small" / "00000.parquet", small_images, args.small_rows
    )
    made = time.perf_counter() - clock
    print(
        f"wrote {big_rows} big rows ({big_size / 1e9:.2f} GB), {args.small_rows} small rows "
        f"({small_size / 1e9:.2f} GB) in {made:.0f} s",
        flush=True,
    )

    results = []
    for name, folder, rows, size, decode_rows in (
        ("big rows (12 MP JPEGs)", work / "big", big_rows, big_size, big_block),
        (
            "many small rows (256 px thumbnails)",
            work / "small",
            args.small_rows,
            small_size,
            small_block,
        ),
    ):
        for block in (64 * 2**20, 16 * 2**20):
            read = measure(_READ, folder, block)
            print(name, "read", block, read, flush=True)
            results.append(
                {"case": name, "rows": rows, "file_bytes": size, "block": block, "read": read}
            )
        decoded = measure(_DECODE, folder, decode_rows)
        print(name, "decode", decoded, flush=True)
        results[-1]["decode"] = decoded
        results[-2]["decode"] = decoded

    lines = [
        "# Images inside Parquet: memory by row size",
        "",
        f"`python benchmarks/parquet_images.py --big-gb {args.big_gb} --small-rows "
        f"{args.small_rows} --rows-per-block {args.rows_per_block}`, "
        f"{dt.date.today().isoformat()}, on {platform.machine()} with {os.cpu_count()} cores "
        f"({platform.platform()}, Python {platform.python_version()}); other jobs shared the "
        f"machine. Files written as img2dataset writes its Parquet output (row groups of 100 "
        f"rows). Peak RSS is VmHWM above the measuring process's baseline (Python, pyarrow and "
        f"memscore imported, the file's footer read).",
        "",
        "| case | rows | file | largest row group | block size | read tasks | blocks | "
        "largest block | read peak RSS | read task reserves | read time | decode block | "
        "decode peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        read, dec = r["read"], r["decode"]
        lines.append(
            f"| {r['case']} | {r['rows']:,} | {r['file_bytes'] / 1e9:.2f} GB | "
            f"{mib(read['row_group'])} MiB | {mib(r['block'])} MiB | {read['plans']} | "
            f"{read['blocks']} | {mib(read['largest_block'])} MiB | "
            f"{mib(read['peak'] - read['baseline'])} MiB | {mib(read['reserved'])} MiB | "
            f"{read['seconds']:.1f} s | {dec['rows']} rows, {mib(dec['block_bytes'])} MiB | "
            f"{mib(dec['peak'] - dec['baseline'])} MiB |"
        )
    lines += [
        "",
        "Read: one process doing what the run's read tasks do, one after another (a run has "
        "several at once, each bounded alike, and each asks Ray for the memory in 'read task "
        "reserves', so a node runs no more of them than it holds). A read task's peak follows "
        "the row group, not the file: pyarrow reads a row group's binary column chunk whole, "
        "and img2dataset's writer (pyarrow's defaults, 100 rows per write) leaves each row "
        "group's images in one dictionary page. Decode: one decode task's call on a block of "
        "`--rows-per-block` rows; its memory is the block's bytes plus the decode's pixel "
        "budget, so for large photos choose a small `--rows-per-block` (16 rows of 12 MP JPEGs "
        "is a 50 MB block).",
        "",
    ]
    Path(args.results).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
