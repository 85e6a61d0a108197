"""Serving benchmark: `memscore serve` under single-image requests against `memscore score`.

One run makes a folder of mixed real images (``score_cpu.py``'s set: phone-sized JPEGs and
web-sized JPEGs and PNGs, a function of ``--images`` and ``--seed``) and, one after the other:

(a) scores the folder with ``memscore score FOLDER --output OUT`` (defaults) and reads its
    images/s from the run summary (the pipeline's wall time, which includes starting the model
    actor and loading the model, but not Ray's start), once before (b) and once after, since
    whatever else runs on the machine drifts; the ratio uses their mean;
(b) starts ``memscore serve`` (defaults: one model replica), waits for ``/healthz``, sends two
    warm-up requests, then at each concurrency of ``--concurrency`` (1, 8, 32) sends
    ``max(images, 2 x concurrency)`` requests of one image each (``POST /score``, the images
    in turn) from that many client threads, each with its own keep-alive connection.

For each concurrency it reports requests/s, the p50 and p95 latency (send to answer, on the
client), the mean forward-pass batch the answers report (``batch_size``), and requests/s as
a share of the batch job's images/s: the serving overhead. The served scores are checked
against the batch job's (the largest difference is reported). The client threads run on the
same cores as the server, as a browser or script on the same machine would; the machine's
load average before and after is reported, since other processes share it.

    python benchmarks/serve.py                       # ~6 minutes on 2 cores -> SERVE_RESULTS.md
    python benchmarks/serve.py --images 12 --concurrency 1,8 --results /tmp/serve.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_cpu import machine, make_images  # noqa: E402  (the same image set)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, default=64, help="images in the generated folder (default 64)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the image set (default 0)")
    parser.add_argument(
        "--concurrency",
        default="1,8,32",
        help="client concurrencies, comma-separated (default 1,8,32)",
    )
    parser.add_argument(
        "--results",
        default=str(ROOT / "benchmarks" / "SERVE_RESULTS.md"),
        help="Markdown file the results are written to",
    )
    return parser.parse_args(argv)


def _memscore() -> list[str]:
    script = Path(sys.executable).parent / "memscore"
    return [str(script)] if script.exists() else [sys.executable, "-m", "memscore.cli"]


def run_batch(folder: Path, workdir: Path, name: str) -> tuple[dict, dict[str, float]]:
    """``memscore score`` on the folder -> (its run summary, {file name: memorability})."""
    import pyarrow.parquet as pq

    out = workdir / name
    done = subprocess.run(
        _memscore() + ["score", str(folder), "--output", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    if done.returncode != 0:
        raise SystemExit(f"memscore score failed ({done.returncode}):\n{done.stderr[-3000:]}")
    table = pq.read_table(out, columns=["path", "memorability"])
    scores = dict(
        zip(
            (Path(p).name for p in table.column("path").to_pylist()),
            table.column("memorability").to_pylist(),
        )
    )
    return json.loads((out / "_memscore.json").read_text()), scores


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    import requests

    port = _free_port()
    log = open(workdir / "serve.log", "wb")
    process = subprocess.Popen(
        _memscore() + ["serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if process.poll() is not None:
                raise SystemExit("memscore serve exited:\n" + (workdir / "serve.log").read_text())
            try:
                if requests.get(f"{url}/healthz", timeout=30).status_code == 200:
                    return process, url
            except (requests.ConnectionError, requests.Timeout):  # starting; a busy machine
                pass
            time.sleep(0.5)
        raise SystemExit("memscore serve was not healthy within 300 s")
    except BaseException:
        stop_server(process)
        raise


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()


def load(url: str, paths: list[Path], concurrency: int, requests_n: int) -> dict:
    """``requests_n`` single-image requests from ``concurrency`` threads -> figures."""
    import requests

    local = threading.local()
    bodies = [(path.name, path.read_bytes()) for path in paths]

    def one(index: int):
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        name, data = bodies[index % len(bodies)]
        started = time.perf_counter()
        answer = session.post(f"{url}/score", files={"file": (name, data)}, timeout=600)
        latency = time.perf_counter() - started
        answer.raise_for_status()
        [image] = answer.json()["images"]
        return name, latency, image

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(requests_n)))
    wall = time.perf_counter() - started
    latencies = np.array([latency for _, latency, _ in results])
    return {
        "concurrency": concurrency,
        "requests": requests_n,
        "wall_s": wall,
        "requests_per_s": requests_n / wall,
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
        "mean_batch": float(np.mean([image["batch_size"] for _, _, image in results])),
        "scores": {name: image["memorability"] for name, _, image in results},
    }


def costs(paths: list[Path], forwards: int = 8) -> dict:
    """Where a request's CPU time goes, in core-seconds, measured in this process on one
    thread: the mean decode (the ingress's ``decode_image_bytes``) over every image, and the
    median of ResMem's forward at batch 1 (``ScoreImages``) over ``forwards`` of them. One
    thread, because two threads' synchronisation on a machine that other processes keep busy
    costs more than the work (measured here: 6-7 s a forward on 2 threads against 0.7-1.2 s
    on one)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    from memscore.columns import ERROR, HEIGHT, WIDTH, pixels_column
    from memscore.models import get_model_weights
    from memscore.stages.decode import decode_image_bytes
    from memscore.stages.predict import ScoreImages

    preprocess = {"resmem": get_model_weights("resmem").DEFAULT.transforms}
    arrays, started = [], time.perf_counter()
    for path in paths:
        arrays.append(decode_image_bytes(path.read_bytes(), preprocess)[2]["resmem"])
    decode = (time.perf_counter() - started) / len(paths)
    scorer = ScoreImages(("resmem",), torch_threads=1)
    times = []
    for array in arrays[: forwards + 1]:
        table = pa.table(
            {
                WIDTH: pa.nulls(1, pa.int32()),
                HEIGHT: pa.nulls(1, pa.int32()),
                ERROR: pa.nulls(1, pa.string()),
                pixels_column("resmem"): ArrowTensorArray.from_numpy(array[None]),
            }
        )
        started = time.perf_counter()
        scorer(table)
        times.append(time.perf_counter() - started)
    return {"decode_s": decode, "forward_s": float(np.median(times[1:]))}  # [0]: warm-up


def report(
    args,
    images: list[dict],
    batches: list[dict],
    levels: list[dict],
    diff: float,
    loads: tuple,
    cost: dict,
) -> list[str]:
    from importlib.metadata import version

    kinds = {}
    for image in images:
        kinds.setdefault(image["kind"], []).append(image["megapixels"])
    mix = ", ".join(
        f"{len(mp)} {kind} ({min(mp):.1f}-{max(mp):.1f} MP)" for kind, mp in sorted(kinds.items())
    )
    rates = [batch["images_per_s"] for batch in batches]
    rate = float(np.mean(rates))
    shown_rates = " and ".join(f"{r:.2f}" for r in rates)
    walls = " and ".join(f"{batch['wall_time_s']:.1f}" for batch in batches)
    lines = [
        "# memscore serve: requests/s and latency against the batch job",
        "",
        f"`python benchmarks/serve.py --images {args.images} --seed {args.seed} "
        f"--concurrency {args.concurrency}`, on {machine()}; torch {version('torch')}, "
        f"ray {version('ray')}. Load average before and after: {loads[0]:.2f}, {loads[1]:.2f} "
        "(other processes share the machine).",
        "",
        f"Images: {len(images)} ({mix}), made by `score_cpu.py`'s `make_images`.",
        "",
        f"Batch job (`memscore score`, defaults), run before and after the server: "
        f"{shown_rates} images/s over {batches[0]['rows_scored']} images, **{rate:.2f} "
        f"images/s** on average, as its run summary reports it (pipeline wall times {walls} s, "
        "which include starting the model actor and loading the model; Ray's start is not).",
        "",
        "`memscore serve` (defaults: ResMem, one model replica, batches of up to 32, 10 ms "
        "batch wait), single-image requests, each client thread with its own connection:",
        "",
        "| concurrency | requests | requests/s | p50 latency | p95 latency | mean batch | "
        "requests/s / batch images/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level in levels:
        lines.append(
            f"| {level['concurrency']} | {level['requests']} | "
            f"{level['requests_per_s']:.2f} | {level['p50_s']:.2f} s | "
            f"{level['p95_s']:.2f} s | {level['mean_batch']:.1f} | "
            f"{level['requests_per_s'] / rate:.2f} |"
        )
    lines += [
        "",
        f"Served scores against the batch job's: largest difference {diff:.1e} "
        "(the contract is 1e-6).",
        "",
        f"Where a request's CPU time goes (measured last, in the benchmark's process, on one "
        f"thread): decoding an image of this set with `decode_image_bytes` takes "
        f"{cost['decode_s']:.2f} core-seconds on average, ResMem's forward at batch 1 "
        f"{cost['forward_s']:.2f}. On {os.cpu_count()} cores that allows at most "
        f"{os.cpu_count() / (cost['decode_s'] + cost['forward_s']):.1f} images/s with nothing "
        "else running; the ingress, the model replica, Ray Serve's proxy and the clients "
        "share them with whatever else runs on the machine.",
        "",
    ]
    return lines


def main(args: argparse.Namespace) -> None:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="memscore-serve-bench-"))
    before = os.getloadavg()[0]
    try:
        folder = workdir / "images"
        folder.mkdir()
        images = make_images(folder, args.images, args.seed)
        paths = [Path(image["path"]) for image in images]
        # the batch job before and after the server: what else runs on the machine drifts
        first, batch_scores = run_batch(folder, workdir, "scores_before")
        process, url = start_server(workdir)
        try:
            load(url, paths[:2], 1, 2)  # warm-up: the first forward allocates
            levels = [load(url, paths, c, max(len(paths), 2 * c)) for c in concurrencies]
        finally:
            stop_server(process)
        second, _ = run_batch(folder, workdir, "scores_after")
        after = os.getloadavg()[0]
        cost = costs(paths)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    diff = max(
        abs(level["scores"][name] - batch_scores[name])
        for level in levels
        for name in level["scores"]
    )
    lines = report(args, images, [first, second], levels, diff, (before, after), cost)
    Path(args.results).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_args())
