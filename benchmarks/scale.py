"""Scale benchmark: `memscore score` on cheap-row manifests of growing size, and on WebDataset shards.

"Cheap rows" are manifest rows whose image does not exist: each comes out as a ``missing file``
error row, so no model time is spent (the model actor still starts and sees every batch) and
what is measured is the pipeline's own cost per row: the manifest snapshot, Ray Data's
scheduling, the decode tasks' per-row work, moving blocks between stages, the model stage's
per-call overhead, the Parquet writes and checkpoint, and the final count.

For each size (``--sizes``) and format (``--formats``) it generates a seeded manifest (a
relative ``path`` to a file that does not exist, plus LAION-like metadata: key, caption, width,
height, similarity), runs ``memscore score MANIFEST --output OUT`` as a whole process (Python's
start, Ray's start and the model load are included), and records:

- wall time and rows per second end to end, and the phases read from Ray's log lines:
  start (Python, imports, Ray's start), snapshot (manifest -> ``_memscore/manifest/``, then the
  plan), pipeline (Ray Data's execution: decode, model, writes), finish (the count read back,
  the summary, removing ``_memscore/``, Ray's shutdown);
- the driver process's peak RSS (``VmHWM`` of the ``memscore`` process itself, polled from
  ``/proc``; Ray's own processes and workers are not counted);
- output files, and the most snapshot parts and checkpoint files seen in ``_memscore/`` during
  the run (memscore deletes that folder at the end);
- exactly once: the summary's ``complete`` and ``memscore verify OUT --manifest MANIFEST``, which
  matches every manifest row with one output row.

The model load is measured apart once (``ScoreImages(("resmem",))`` in a fresh process).
WebDataset (``--webdataset-samples`` samples of real small images in 4 shards): the reader alone
(``memscore.sources.webdataset.iter_shard``), then ``memscore score`` on the shards end to end, model
time included, and ``memscore verify``.

The machine is assumed shared: the table records the load average and the CPU steal share of
each run; compare rows measured in one invocation.

    python benchmarks/scale.py                                  # 100k, 1M, 10M; CSV and Parquet
    python benchmarks/scale.py --sizes 100000,1000000 --formats csv --results /tmp/scale.md
    python benchmarks/scale.py --sizes 20000 --score-args "--rows-per-block 1024"
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

# describe the machine as the other benchmarks do (run as a script, this folder is on sys.path)
from score_cpu import machine

ROOT = Path(__file__).resolve().parent.parent
#: Rows generated (and written) at a time: the generator's memory does not grow with the size.
CHUNK_ROWS = 500_000
WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "red",
    "old",
    "small",
    "city",
    "dog",
    "beach",
    "at",
    "night",
    "portrait",
    "landscape",
    "blue",
    "car",
    "house",
    "tree",
    "river",
    "with",
    "and",
    "cat",
)
#: Ray's log line timestamps, e.g. "2026-11-29 13:55:43,188\tINFO worker.py:2038 -- ..."
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s+INFO\s+(.*)$")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="100000,1000000,10000000",
        help="manifest rows, comma-separated (default 100000,1000000,10000000)",
    )
    parser.add_argument(
        "--formats",
        default="csv,parquet",
        help="manifest formats, comma-separated: csv, parquet (default both)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the manifests (default 0)")
    parser.add_argument(
        "--workdir",
        default=None,
        help="where manifests and outputs go (default: a temporary folder, "
        "deleted at the end; a 10M-row CSV is about 0.9 GB)",
    )
    parser.add_argument(
        "--results",
        default=str(ROOT / "benchmarks" / "SCALE_RESULTS.md"),
        help="Markdown file to write (default benchmarks/SCALE_RESULTS.md)",
    )
    parser.add_argument(
        "--score-args", default="", help="more options for every `memscore score`, as one string"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3600,
        help="seconds before a run is killed and reported as such",
    )
    parser.add_argument(
        "--webdataset-samples",
        type=int,
        default=1000,
        help="samples of the WebDataset reader measurement (0: skip it)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip `memscore verify` (the summary's own check still counts)",
    )
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ manifests
def manifest_chunks(rows: int, seed: int):
    """The manifest as pyarrow tables of at most CHUNK_ROWS rows; a function of rows and seed."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        ids = np.arange(start, start + n)
        # relative to the manifest's folder, where nothing named "missing" exists
        paths = [f"missing/{i % 1000:03d}/{i:09d}.jpg" for i in ids.tolist()]
        picks = words[rng.integers(0, len(words), size=(n, 4))]
        captions = [" ".join(r) for r in picks.tolist()]
        yield pa.table(
            {
                "path": pa.array(paths, pa.string()),
                "key": pa.array(ids, pa.int64()),
                "caption": pa.array(captions, pa.string()),
                "width": pa.array(rng.integers(64, 4096, n), pa.int32()),
                "height": pa.array(rng.integers(64, 4096, n), pa.int32()),
                "similarity": pa.array(rng.random(n), pa.float64()),
            }
        )


def write_manifest(path: Path, rows: int, fmt: str, seed: int) -> None:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    writer = None
    try:
        for table in manifest_chunks(rows, seed):
            if writer is None:
                writer = (
                    pcsv.CSVWriter(str(path), table.schema)
                    if fmt == "csv"
                    else pq.ParquetWriter(str(path), table.schema)
                )
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


# ------------------------------------------------------------------------------- one run
def _cpu_times() -> tuple[int, int]:
    """(all jiffies, steal jiffies) of the machine, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _count(folder: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0


def _stamps(log: Path) -> dict[str, float]:
    """Epoch seconds of the Ray log lines that mark the phases (first occurrence each)."""
    marks = {
        "ray_started": "Started a local Ray instance",
        "execution_started": "Starting execution of Dataset",
        "execution_finished": "execution finished in",
    }
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        for name, text in marks.items():
            if name not in found and text in m.group(2):
                stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                found[name] = stamp.timestamp()
    return found


def run_score(manifest: Path, output: Path, extra: list[str], timeout: float) -> dict:
    """``memscore score`` as one process, polled for its peak RSS and the files it writes."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = ["memscore", "score", str(manifest), "--output", str(output), *extra]
    log = output.with_suffix(".log")
    work = output / "_memscore"
    most = {"snapshot_parts": 0, "checkpoint_files": 0}
    peak_kib = 0
    peak_at = None
    load_before = os.getloadavg()[0]
    cpu0, steal0 = _cpu_times()
    started = time.time()
    clock = time.perf_counter()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        last_scan = 0.0
        timed_out = False
        while proc.poll() is None:
            hwm = _status_kib(proc.pid, "VmHWM")
            if hwm:
                if hwm > peak_kib:
                    peak_at = time.time()  # when the driver's RSS last grew past its peak
                peak_kib = max(peak_kib, hwm)
            now = time.perf_counter()
            if now - last_scan > 1.0:
                most["snapshot_parts"] = max(most["snapshot_parts"], _count(work / "manifest"))
                # .pending files are renamed once committed: count the committed ones
                try:
                    names = [e.name for e in os.scandir(work / "checkpoint")]
                except FileNotFoundError:
                    names = []
                done = sum(not n.endswith(".pending.parquet") for n in names)
                most["checkpoint_files"] = max(most["checkpoint_files"], done)
                last_scan = now
            if now - clock > timeout:
                proc.kill()
                timed_out = True
            time.sleep(0.05)
    wall = time.perf_counter() - clock
    cpu1, steal1 = _cpu_times()
    result = {
        "command": " ".join(shlex.quote(c) for c in ["memscore", *command[1:]]),
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_s": wall,
        "driver_peak_rss_mib": peak_kib / 1024,
        **most,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "steal": (steal1 - steal0) / max(1, cpu1 - cpu0),
        "log": str(log),
    }
    marks = _stamps(log)
    if {"ray_started", "execution_started", "execution_finished"} <= marks.keys():
        result["phases"] = {
            "start_s": marks["ray_started"] - started,
            "snapshot_s": marks["execution_started"] - marks["ray_started"],
            "pipeline_s": marks["execution_finished"] - marks["execution_started"],
            "finish_s": started + wall - marks["execution_finished"],
        }
        if peak_at is not None:
            bounds = [
                ("start", marks["ray_started"]),
                ("snapshot", marks["execution_started"]),
                ("pipeline", marks["execution_finished"]),
                ("finish", float("inf")),
            ]
            result["peak_rss_phase"] = next(name for name, end in bounds if peak_at <= end)
    summary = output / "_memscore.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        result.update(
            rows_out=data["rows_out"],
            complete=data["complete"],
            error_kinds=data["error_kinds"],
            rows_scored=data["rows_scored"],
        )
    result["output_files"] = len(list(output.glob("memscore-part_*.parquet")))
    return result


def run_verify(manifest: Path, output: Path) -> tuple[bool, float, str]:
    clock = time.perf_counter()
    proc = subprocess.run(
        ["memscore", "verify", str(output), "--manifest", str(manifest)],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode == 0, time.perf_counter() - clock, text[-1] if text else ""


def model_load_s() -> float:
    """Import torch and build ResMem with its published weights, in a fresh process."""
    code = (
        "import time; t = time.perf_counter(); from memscore.stages.predict import ScoreImages; "
        "ScoreImages(('resmem',)); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- WebDataset
def make_shards(folder: Path, samples: int, seed: int, shards: int = 4) -> list[Path]:
    """``samples`` small JPEGs (crops of the bundled photos, 96-320 px) with .json and .txt
    members, in ``shards`` tar files, keys in sorted order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = [
        Image.open(p).convert("RGB")
        for p in sorted((ROOT / "examples" / "images").iterdir())
        if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    ]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-samples // shards)
    for s in range(shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per, min(samples, (s + 1) * per)):
                image = sources[int(rng.integers(len(sources)))]
                side = int(rng.integers(96, 321))
                x, y = (int(rng.integers(0, max(1, d - side))) for d in image.size)
                crop = image.crop((x, y, x + side, y + side)).resize((side, side))
                buf = io.BytesIO()
                crop.save(buf, "JPEG", quality=int(rng.integers(75, 95)))
                members = {
                    "jpg": buf.getvalue(),
                    "json": json.dumps({"key": i, "side": side}).encode(),
                    "txt": f"sample {i}".encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def measure_webdataset(
    folder: Path, samples: int, seed: int, extra: list[str], timeout: float
) -> dict:
    """The reader alone (in this process), then ``memscore score SHARDS`` end to end (decode
    and ResMem's forward on every sample, as one process) and ``memscore verify``."""
    from memscore.sources.webdataset import iter_shard

    shards = make_shards(folder / "shards", samples, seed)
    size = sum(p.stat().st_size for p in shards)
    clock = time.perf_counter()
    rows = errors = 0
    for index, shard in enumerate(shards):
        for table in iter_shard(str(shard), shard_index=index):
            rows += table.num_rows
            errors += table.num_rows - table.column("memscore_error").null_count
    wall = time.perf_counter() - clock
    output = folder / "out"
    score = run_score(folder / "shards", output, extra, timeout)
    if score["returncode"] == 0:
        ok, took, line = run_verify(folder / "shards", output)
        score.update(verified=ok, verify_s=took, verify_line=line)
    return {
        "samples": samples,
        "rows": rows,
        "errors": errors,
        "shards": len(shards),
        "mib": size / 2**20,
        "wall_s": wall,
        "score": score,
    }


# ------------------------------------------------------------------------------- report
def _versions() -> str:
    from importlib import metadata

    return ", ".join(f"{n} {metadata.version(n)}" for n in ("memscore", "ray", "pyarrow", "torch"))


def report(args, runs: list[dict], load: float | None, wds: dict | None, began: str) -> str:
    lines = [
        "# Scale benchmark: cheap rows through `memscore score`",
        "",
        f"Machine: {machine()}. {_versions()}.",
        f"Started {began}, finished "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}.",
        "",
        f"Command: `python benchmarks/scale.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`".replace(
            "``", "`(defaults)`"
        ),
        "",
        "Every row's image is missing: each comes out as a `missing file` error row and no model "
        "time is spent, so this is the pipeline's own cost per row. Each run is "
        "`memscore score MANIFEST --output OUT` as one process"
        + (f" with `{' '.join(args.extra)}`" if args.extra else "")
        + ". Phases from Ray's log lines: start = Python, imports and Ray's start; snapshot = "
        "the manifest copied to `_memscore/manifest/`; pipeline = Ray Data's execution (decode, "
        "model stage, writes; the model actor's start and load overlap it); finish = the "
        "count read back, the summary, removing `_memscore/`, shutdown. RSS is the driver "
        "process's own peak (VmHWM), not Ray's workers, with the phase in which it was "
        "reached. Snapshot parts and checkpoint files are the most seen by a scan once a "
        "second (memscore deletes `_memscore/` at the end, so a "
        "run shorter than a file's lifetime can show 0). Exactly once: "
        "the summary's check and `memscore verify`. Load: the 1-minute load average before "
        "and after the run (the machine is shared); steal: the hypervisor's share of CPU time.",
        "",
    ]
    if load is not None:
        lines += [
            f"Model load alone (import torch, build ResMem with its published weights, "
            f"fresh process): {load:.1f} s.",
            "",
        ]
    lines += [
        "| manifest | rows | wall s | rows/s | start s | snapshot s | pipeline s | pipeline rows/s "
        "| finish s | driver peak RSS MiB | output files | snapshot parts | checkpoint files "
        "| exactly once | load | steal |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- | --- | ---: |",
    ]
    for r in runs:
        if r.get("returncode") != 0:
            timed = ", timed out" if r.get("timed_out") else ""
            why = f"failed (exit {r.get('returncode')}{timed})"
            cells = [r["format"], f"{r['rows']:,}", f"{r['wall_s']:.1f}", why] + [""] * 12
            lines.append("| " + " | ".join(cells) + " |")
            continue
        p = r.get("phases", {})
        pipe = p.get("pipeline_s")

        def f(key, p=p):
            return f"{p[key]:.1f}" if key in p else "?"

        once = "yes" if r.get("complete") and r.get("verified", True) else "NO"
        if r.get("verify_line") is not None:
            once += f" (verify {r['verify_s']:.0f} s)"
        pipe_rate = f"{r['rows'] / pipe:,.0f}" if pipe else "?"
        peak_phase = f" ({r['peak_rss_phase']})" if r.get("peak_rss_phase") else ""
        lines.append(
            f"| {r['format']} | {r['rows']:,} | {r['wall_s']:.1f} | {r['rows'] / r['wall_s']:,.0f} "
            f"| {f('start_s')} | {f('snapshot_s')} | {f('pipeline_s')} "
            f"| {pipe_rate} | {f('finish_s')} "
            f"| {r['driver_peak_rss_mib']:.0f}{peak_phase} | {r['output_files']} "
            f"| {r['snapshot_parts']} "
            f"| {r['checkpoint_files']} | {once} | {r['load_before']:.1f} -> {r['load_after']:.1f} "
            f"| {100 * r['steal']:.0f}% |"
        )
    ok = [r for r in runs if r.get("returncode") == 0]
    for fmt in sorted({r["format"] for r in ok}):
        same = sorted((r for r in ok if r["format"] == fmt), key=lambda r: r["rows"])
        if len(same) >= 2:
            a, b = same[0], same[-1]
            marginal = (b["rows"] - a["rows"]) / max(1e-9, b["wall_s"] - a["wall_s"])
            ratio = (b["rows"] / b["wall_s"]) / (a["rows"] / a["wall_s"])
            lines += [
                "",
                f"{fmt}: {b['rows']:,} rows at {ratio:.2f}x "
                f"the rows/s of {a['rows']:,}; marginal cost {marginal:,.0f} rows/s "
                f"(the extra rows over the extra wall time).",
            ]
    lines += ["", "## WebDataset", ""]
    if wds is None:
        lines.append("Not measured (`--webdataset-samples 0`).")
    elif "failed" in wds:
        lines.append(f"The reader measurement failed: {wds['failed']}")
    else:
        lines.append(
            f"{wds['shards']} shards of {wds['samples']:,} samples ({wds['mib']:.1f} MiB: small "
            f"JPEGs of 96-320 px, each with .json and .txt members). The reader alone "
            f"(`memscore.sources.webdataset.iter_shard`, in this process, no Ray): {wds['wall_s']:.2f} s, "
            f"{wds['rows'] / wds['wall_s']:,.0f} samples/s, "
            f"{wds['mib'] / wds['wall_s']:.0f} MiB/s; {wds['rows']:,} rows, {wds['errors']} "
            f"error rows."
        )
        r = wds["score"]
        if r.get("returncode") != 0:
            lines += [
                "",
                f"`memscore score` on the shards failed (exit {r.get('returncode')}; "
                f"log {r.get('log')}).",
            ]
        else:
            p = r.get("phases", {})
            pipe = p.get("pipeline_s")
            once = "yes" if r.get("complete") and r.get("verified", True) else "NO"
            lines += [
                "",
                (
                    f"`memscore score SHARDS --output OUT` end to end (decode and ResMem's "
                    f"float32 forward on the CPU for every sample, one process): "
                    f"{r['wall_s']:.1f} s wall, {wds['samples'] / r['wall_s']:.1f} samples/s"
                    + (
                        f" ({wds['samples'] / pipe:.1f} in the pipeline, {pipe:.1f} s)"
                        if pipe
                        else ""
                    )
                    + f"; {r.get('rows_scored', '?')} scored of {r.get('rows_out', '?')} rows; "
                    f"driver peak RSS {r['driver_peak_rss_mib']:.0f} MiB; {r['output_files']} "
                    f"output file(s); exactly once: {once}; load {r['load_before']:.1f} -> "
                    f"{r['load_after']:.1f}. The model's forward is the cost here, not the reader."
                ),
            ]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for fmt in formats:
        if fmt not in ("csv", "parquet"):
            raise SystemExit(f"--formats: unknown format {fmt!r} (csv, parquet)")
    extra = shlex.split(args.score_args)
    # Every row is an error row on purpose: a memscore that stops runs with too many errors
    # must be told not to.
    helptext = subprocess.run(
        ["memscore", "score", "--help"], capture_output=True, text=True
    ).stdout
    if "--max-error-fraction" in helptext and "--max-error-fraction" not in extra:
        extra += ["--max-error-fraction", "1"]
    args.extra = extra
    began = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    own = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="memscore-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    try:
        load = model_load_s()
        print(f"model load alone: {load:.1f} s", flush=True)
        for rows in sizes:
            for fmt in formats:
                manifest = work / f"manifest-{rows}.{fmt}"
                clock = time.perf_counter()
                write_manifest(manifest, rows, fmt, args.seed)
                made = time.perf_counter() - clock
                output = work / f"out-{rows}-{fmt}"
                shutil.rmtree(output, ignore_errors=True)
                result = {
                    "rows": rows,
                    "format": fmt,
                    "manifest_mib": manifest.stat().st_size / 2**20,
                    "generate_s": made,
                    **run_score(manifest, output, extra, args.timeout),
                }
                if result["returncode"] == 0 and not args.no_verify:
                    ok, took, line = run_verify(manifest, output)
                    result.update(verified=ok, verify_s=took, verify_line=line)
                runs.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "command"}), flush=True)
                shutil.rmtree(output, ignore_errors=True)
                manifest.unlink()
        wds = None
        if args.webdataset_samples:
            try:
                wds = measure_webdataset(
                    work / "webdataset", args.webdataset_samples, args.seed, extra, args.timeout
                )
            except Exception as exc:  # the runs above are not lost for it
                wds = {"failed": f"{type(exc).__name__}: {exc}"}
        if wds:
            print(json.dumps(wds, default=str), flush=True)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    text = report(args, runs, load, wds, began)
    Path(args.results).write_text(text)
    print(text)
    return 0 if all(r.get("returncode") == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
