"""memscore serve: the options, then a real server (``memscore serve`` in a subprocess, real
HTTP), the batch job's scores, batching, bad requests and bad files among good ones, /healthz,
memscore's counters in /metrics, and the page in a real headless browser (Debian's chromium
driven by selenium)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from badimages import write_bomb_png, write_truncated_jpeg

from memscore.cli import main
from memscore.config import MemscoreError
from memscore.serve.app import build, deployment_options, metrics_text, score_answer
from memscore.serve.config import ServeConfig, parse_replicas

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resmem", "falseresmem")
SCORE_COLUMNS = {"resmem": "memorability", "falseresmem": "false_alarm"}
#: The test server's upload limit: small, so that a too-large upload is cheap to send.
MAX_UPLOAD_MB = 2
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


# ------------------------------------------------------------------------------- options
def test_replicas_are_a_count_or_a_range():
    assert parse_replicas("3") == (3, 3)
    assert parse_replicas(" 1 - 4 ") == (1, 4)
    for bad in ("0", "4-2", "two", "1-", ""):
        with pytest.raises(MemscoreError, match="--replicas"):
            parse_replicas(bad)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"models": "nope"}, "unknown model 'nope'"),
        ({"models": "resmem,resmem"}, "named twice"),
        ({"models": "resmem,falseresmem", "weights": "x.pt"}, "--weights applies to one model"),
        ({"port": 0}, "--port 0"),
        ({"max_upload_mb": 0}, "--max-upload-mb"),
        ({"max_batch_size": 0}, "--max-batch-size"),
        ({"replicas": "2-1"}, "--replicas"),
    ],
)
def test_bad_options_are_refused_in_one_line(fields, message):
    with pytest.raises(MemscoreError, match=re.escape(message)):
        ServeConfig(**fields).validated()


def test_deployments_ask_for_a_gpu_per_replica_only_where_the_cluster_has_gpus():
    cpu = deployment_options(ServeConfig(replicas="2"), cluster_gpus=0)
    assert cpu["model"]["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert cpu["model"]["num_replicas"] == 2 and not cpu["model"]["use_gpu"]
    gpu = deployment_options(ServeConfig(replicas="1-4"), cluster_gpus=8)
    assert gpu["model"]["ray_actor_options"]["num_gpus"] == 1.0 and gpu["model"]["use_gpu"]
    assert gpu["model"]["autoscaling_config"]["min_replicas"] == 1
    assert gpu["model"]["autoscaling_config"]["max_replicas"] == 4
    assert "num_replicas" not in gpu["model"]
    # a replica holds a running batch and the next one gathering
    assert gpu["model"]["max_ongoing_requests"] == 2 * ServeConfig().max_batch_size
    forced_cpu = deployment_options(ServeConfig(gpus_per_replica=0), cluster_gpus=8)
    assert forced_cpu["model"]["ray_actor_options"]["num_gpus"] == 0


def test_a_serve_config_files_args_are_checked_by_name():
    with pytest.raises(MemscoreError, match="unknown memscore serve option.*modelz"):
        build({"modelz": "resmem"})
    with pytest.raises(MemscoreError, match="memnet: .*weights"):
        build({"models": "memnet"})  # no published weights: said before anything starts


def test_the_serve_config_file_is_valid_for_ray_serve_and_memscore():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    text = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(text)
    [application] = schema.applications
    assert application.import_path == "memscore.serve.app:build"
    args = application.args
    build(args)  # memscore's own checks of the options, and the weights files
    # GPU replicas even before the autoscaler has started a GPU node
    options = deployment_options(ServeConfig(**args), cluster_gpus=0)
    assert options["model"]["ray_actor_options"]["num_gpus"] == 1
    assert schema.http_options.host == "127.0.0.1"


def test_cli_refuses_bad_options_and_a_taken_port_before_starting_ray(capsys):
    import ray

    ray_before = ray.is_initialized()
    assert main(["serve", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1
    assert ray.is_initialized() == ray_before


def test_metrics_keep_ray_serves_and_memscores_own_once_each_from_every_node():
    def node(address: str, with_memscore: bool) -> str:
        text = (
            "# HELP ray_serve_x Requests.\n# TYPE ray_serve_x counter\n"
            f'ray_serve_x{{node="{address}"}} 3.0\n'
            "# HELP python_gc_y GC.\n# TYPE python_gc_y counter\npython_gc_y 1.0\n"
        )
        if with_memscore:  # a model replica's node
            text += (
                "# HELP ray_memscore_model_seconds_total Seconds.\n"
                "# TYPE ray_memscore_model_seconds_total counter\n"
                f'ray_memscore_model_seconds_total{{model="resmem",node="{address}"}} 2.5\n'
                "# HELP ray_memscore_batch Sizes.\n# TYPE ray_memscore_batch histogram\n"
                f'ray_memscore_batch_bucket{{le="+Inf",node="{address}"}} 2.0\n'
                f'ray_memscore_batch_count{{node="{address}"}} 2.0\n'
            )
        return text

    assert metrics_text([node("a", False), node("b", True), node("c", True)]) == (
        "# HELP ray_serve_x Requests.\n# TYPE ray_serve_x counter\n"
        'ray_serve_x{node="a"} 3.0\nray_serve_x{node="b"} 3.0\nray_serve_x{node="c"} 3.0\n'
        "# HELP memscore_model_seconds_total Seconds.\n"
        "# TYPE memscore_model_seconds_total counter\n"
        'memscore_model_seconds_total{model="resmem",node="b"} 2.5\n'
        'memscore_model_seconds_total{model="resmem",node="c"} 2.5\n'
        "# HELP memscore_batch Sizes.\n# TYPE memscore_batch histogram\n"
        'memscore_batch_bucket{le="+Inf",node="b"} 2.0\nmemscore_batch_count{node="b"} 2.0\n'
        'memscore_batch_bucket{le="+Inf",node="c"} 2.0\nmemscore_batch_count{node="c"} 2.0\n'
    )
    assert metrics_text(["# HELP python_gc_y GC.\npython_gc_y 1.0\n"]) == ""


def test_a_request_is_200_once_a_file_is_scored_else_422_or_500_with_every_files_entry():
    good = {"file": "a.png", "memorability": 0.8}
    bad = [{"file": f"bad{i}.jpg", "error": "not an image: text"} for i in range(5)]
    assert score_answer([bad[0], good], model_failed=False).status_code == 200
    assert score_answer([good, bad[0]], model_failed=True).status_code == 200
    for entries, model_failed, status, error in [
        (bad[:1], False, 422, "bad0.jpg: not an image: text"),
        (
            bad,
            False,
            422,
            "none of the 5 files could be scored: bad0.jpg: not an image: text; "
            "bad1.jpg: not an image: text; bad2.jpg: not an image: text; "
            "and 2 more",
        ),
        (bad[:1], True, 500, "bad0.jpg: not an image: text"),  # a model's failure: the server's
    ]:
        answer = score_answer(entries, model_failed=model_failed)
        assert answer.status_code == status
        assert json.loads(answer.body) == {"error": error, "images": entries}


def test_the_page_loads_nothing_from_elsewhere():
    page = (ROOT / "memscore" / "serve" / "page.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and not re.search(r"url\(\s*['\"]?(https?:)?//", page)
    assert 'type="file"' in page and "drop" in page


# -------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    #: every /healthz poll while it started: (time.time() once answered, status or None, body)
    polls: list


def _restore_sigint():  # the child must see Ctrl-C even where the tests run with it ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_server(folder: Path, *options: str) -> Server:
    """``memscore serve --port <free> OPTIONS`` in its own process, once /healthz is 200."""
    import requests

    port = _free_port()
    log = folder / "serve.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "memscore.cli", "serve", "--port", str(port), *options],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            preexec_fn=_restore_sigint,
        )
    url = f"http://127.0.0.1:{port}"
    polls = []
    deadline = time.time() + 300
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"memscore serve exited with {process.returncode}:\n" + log.read_text()[-3000:]
                )
            try:
                answer = requests.get(f"{url}/healthz", timeout=30)
                is_json = answer.headers.get("content-type", "").startswith("application/json")
                polls.append(
                    (time.time(), answer.status_code, answer.json() if is_json else answer.text)
                )
                if answer.status_code == 200:
                    return Server(url, process, log, polls)
            except (requests.ConnectionError, requests.Timeout):  # Ray starting; a busy machine
                polls.append((time.time(), None, None))
            if time.time() > deadline:
                pytest.fail("memscore serve not healthy in 300 s:\n" + log.read_text()[-3000:])
            time.sleep(0.25)
    except BaseException:
        _stop_server(process)
        raise


def _stop_server(process: subprocess.Popen) -> int:
    """Ctrl-C, as a person stops it; -> its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``memscore serve`` (ResMem and FalseResMem) on a free port, in its own process."""
    started = _start_server(
        tmp_path_factory.mktemp("serve"),
        "--model",
        ",".join(MODELS),
        "--max-upload-mb",
        str(MAX_UPLOAD_MB),
    )
    try:
        yield started
    finally:
        _stop_server(started.process)


@pytest.fixture(scope="module")
def batch_job():
    """The batch job's two stages without Ray: ``DecodeImages`` and ``ScoreImages``, which
    ``memscore score`` runs on Ray Data, in batches of 32 as there; -> ``score(paths,
    **decode_options)`` -> {file name: output row}."""
    import pyarrow as pa

    from memscore.models import get_model_weights
    from memscore.stages.decode import DecodeImages
    from memscore.stages.predict import ScoreImages

    preprocess = {name: get_model_weights(name).DEFAULT.transforms for name in MODELS}
    scorer = ScoreImages(MODELS, batch_size=32)

    def score(paths, **decode_options) -> dict[str, dict]:
        table = pa.table({"path": [str(path) for path in paths]})
        scored = scorer(DecodeImages("path", preprocess, **decode_options)(table))
        return {Path(row["path"]).name: row for row in scored.to_pylist()}

    return score


@pytest.fixture(scope="module")
def batch_scores(batch_job, example_images):
    """The batch job's scores of the example images -> {file name: row}."""
    return batch_job(example_images)


def _post(url: str, files: list[tuple[str, bytes]], query: str = ""):
    import requests

    return requests.post(
        f"{url}/score{query}", files=[("file", (name, data)) for name, data in files], timeout=300
    )


def _read(path: Path) -> tuple[str, bytes]:
    return path.name, path.read_bytes()


def _check_scores(image: dict, row: dict, models=MODELS) -> None:
    for name in models:
        column = SCORE_COLUMNS[name]
        assert abs(image[column] - row[column]) <= 1e-6, (
            image["file"],
            column,
            image[column],
            row[column],
        )
    assert (image["width"], image["height"]) == (row["memscore_width"], row["memscore_height"])


@pytest.mark.slow
def test_healthz_turns_200_only_once_the_models_are_loaded(server):
    import requests

    models = requests.get(f"{server.url}/models", timeout=30).json()
    first_ok = next(when for when, status, _ in server.polls if status == 200)
    assert first_ok >= models["loaded_at"]  # answered 200 only after the replica had loaded
    loading = [body for _, status, body in server.polls if status == 503]
    assert loading, f"the ingress never answered while the models loaded: {server.polls}"
    assert all(body["error"].startswith("not ready") for body in loading)
    # before that: no answer (Ray starting), Serve's proxy without the route yet, or 503
    before = {
        (status, body if status != 503 else "not ready") for _, status, body in server.polls[:-1]
    }
    assert {status for status, _ in before} <= {None, 404, 503}, before
    ready = requests.get(f"{server.url}/healthz", timeout=30)
    assert ready.status_code == 200 and ready.json()["models"] == list(MODELS)
    # the log says where it listens, and then that it is ready (serve.run has returned,
    # which may be a moment after the first 200)
    deadline = time.time() + 60
    while "memscore serve: ready in" not in server.log.read_text() and time.time() < deadline:
        time.sleep(0.5)
    log = server.log.read_text()
    assert f"memscore serve: listening on {server.url}" in log
    assert log.index("listening on") < log.index("memscore serve: ready in")


@pytest.mark.slow
def test_every_example_image_gets_the_batch_jobs_scores(server, example_images, batch_scores):
    from memscore.models import get_model_weights
    from memscore.models._api import file_sha256

    sha256 = {name: file_sha256(get_model_weights(name).DEFAULT.path()) for name in MODELS}
    for path in example_images:  # one request per image
        answer = _post(server.url, [_read(path)])
        assert answer.status_code == 200, answer.text
        [image] = answer.json()["images"]
        assert image["file"] == path.name
        _check_scores(image, batch_scores[path.name])
        assert [(m["model"], m["weights_sha256"]) for m in image["models"]] == [
            (name, sha256[name]) for name in MODELS
        ]
    # all in one request, in order; and one model of the two by name
    answer = _post(server.url, [_read(path) for path in example_images])
    assert [image["file"] for image in answer.json()["images"]] == [
        path.name for path in example_images
    ]
    for image in answer.json()["images"]:
        _check_scores(image, batch_scores[image["file"]])
    answer = _post(server.url, [_read(example_images[0])], "?model=falseresmem")
    [image] = answer.json()["images"]
    assert "memorability" not in image and [m["model"] for m in image["models"]] == ["falseresmem"]
    _check_scores(image, batch_scores[example_images[0].name], models=("falseresmem",))


@pytest.mark.slow
def test_32_requests_at_once_are_all_answered_in_batches(server, example_images, batch_scores):

    def one(index: int):
        path = example_images[index % len(example_images)]
        return path.name, _post(server.url, [_read(path)], "?model=resmem")

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(one, range(32)))
    assert [answer.status_code for _, answer in answers] == [200] * 32
    sizes = Counter()
    for name, answer in answers:
        [image] = answer.json()["images"]
        _check_scores(image, batch_scores[name], models=("resmem",))
        sizes[image["batch_size"]] += 1
    # batch_size: the images in the forward pass that scored this one. Batches of more than
    # one formed, and each batch of k images shows in exactly k answers.
    assert max(sizes) > 1, sizes
    assert all(count % size == 0 for size, count in sizes.items()), sizes


def _batch_histogram(url: str) -> dict[str, float]:
    """Ray Serve's ``@serve.batch`` histogram of memscore's score_batch, summed over replicas."""
    import requests

    text = requests.get(f"{url}/metrics", timeout=30).text
    return {
        kind: sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(f"ray_serve_actual_batch_size_{kind}{{")
            and 'function_name="score_batch"' in line
        )
        for kind in ("count", "sum")
    }


@pytest.mark.slow
def test_ray_serves_batch_size_histogram_counts_the_batches_of_32_requests(server, example_images):
    """Ray Serve's own metrics say what the answers say: more images than batches. (Extended
    tier: the histogram is exported by each replica's process every few seconds, and on a
    loaded 2-core machine its count and sum were seen out of step for over 90 s.)"""
    before = _batch_histogram(server.url)

    def one(index: int):
        path = example_images[index % len(example_images)]
        return _post(server.url, [_read(path)], "?model=resmem")

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(one, range(32)))
    sizes = Counter(answer.json()["images"][0]["batch_size"] for answer in answers)
    batches_here = sum(count // size for size, count in sizes.items())
    deadline = time.time() + 180
    while True:
        now = _batch_histogram(server.url)
        counted = now["count"] - before["count"]
        images = now["sum"] - before["sum"]
        if counted >= batches_here and images >= 32:
            break
        assert time.time() < deadline, f"batch-size metrics not exported: {before} -> {now}"
        time.sleep(2)
    assert images > counted  # batches of more than one image


@pytest.mark.slow
def test_decode_options_as_query_parameters_give_the_batch_jobs_scores_with_them(
    server, batch_job, tmp_path, example_images
):
    from badimages import write_exif_rotated_jpeg
    from PIL import Image

    rotated = write_exif_rotated_jpeg(tmp_path)
    big = tmp_path / "big.jpg"  # 4x the model's 256-pixel resize on both sides: drafted
    with Image.open(example_images[0]) as image:
        image.convert("RGB").resize((2048, 1536)).save(big, quality=90)
    for path, query, option in (
        (rotated, "?exif_transpose=true", "exif_transpose"),
        (big, "?fast_decode=true", "fast_decode"),
    ):
        plain, with_option = batch_job([path])[path.name], batch_job([path], **{option: True})
        [image] = _post(server.url, [_read(path)], query).json()["images"]
        _check_scores(image, with_option[path.name])
        [default] = _post(server.url, [_read(path)]).json()["images"]
        _check_scores(default, plain)
        assert image["memorability"] != default["memorability"], option  # the option acted
    # fast decode reports the full size, as the batch job does; the EXIF orientation turns
    # the stored size round
    assert (
        (image["width"], image["height"]) == (default["width"], default["height"]) == (2048, 1536)
    )
    [upright] = _post(server.url, [_read(rotated)], "?exif_transpose=true").json()["images"]
    [stored] = _post(server.url, [_read(rotated)]).json()["images"]
    assert (upright["width"], upright["height"]) == (stored["height"], stored["width"])


def _bad_files(tmp: Path) -> list[Path]:
    """One file of each kind a request can hold that is no image to score."""
    (tmp / "empty.jpg").write_bytes(b"")
    (tmp / "notes.jpg").write_bytes(b"just some text\n" * 40)
    return [tmp / "empty.jpg", tmp / "notes.jpg", write_truncated_jpeg(tmp), write_bomb_png(tmp)]


@pytest.mark.slow
def test_a_request_with_bad_files_scores_its_good_ones_and_names_each_bad_one(
    server, batch_job, tmp_path, example_images
):
    empty, notes, truncated, bomb = bad = _bad_files(tmp_path)
    # what the batch job writes in memscore_error for each (after the kind and the detail of
    # the bytes, it names the path of an empty file, which an upload does not have)
    batch_errors = {name: row["memscore_error"] for name, row in batch_job(bad).items()}
    first, second = example_images[0], example_images[3]
    alone = {
        path.name: _post(server.url, [_read(path)]).json()["images"][0] for path in (first, second)
    }

    answer = _post(server.url, [_read(first), _read(notes), _read(second)])
    assert answer.status_code == 200, answer.text
    assert list(answer.json()) == ["images"]
    images = answer.json()["images"]
    assert [image["file"] for image in images] == [first.name, notes.name, second.name]
    assert list(images[1]) == ["file", "error"]
    assert images[1]["error"].startswith("not an image: ")
    assert images[1]["error"] == batch_errors[notes.name]
    for image in (images[0], images[2]):  # what a request of that file alone gets
        single = alone[image["file"]]
        for column in SCORE_COLUMNS.values():
            assert abs(image[column] - single[column]) <= 1e-6, (image["file"], column)
        assert (image["width"], image["height"]) == (single["width"], single["height"])
        assert image["models"] == single["models"] and "error" not in image

    answer = _post(server.url, [_read(path) for path in bad])
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert [image["file"] for image in body["images"]] == [path.name for path in bad]
    kinds = [image["error"].split(":")[0] for image in body["images"]]
    assert kinds == ["empty file", "not an image", "truncated", "decompression bomb"]
    for image in body["images"]:
        assert list(image) == ["file", "error"]
        assert batch_errors[image["file"]].startswith(image["error"]), image
    assert body["error"] == (
        "none of the 4 files could be scored: "
        + "; ".join(f"{image['file']}: {image['error']}" for image in body["images"][:3])
        + "; and 1 more"
    )
    # a request refused as a whole is still refused before any file: no entries
    answer = _post(server.url, [_read(first), _read(notes)], "?model=nope")
    assert answer.status_code == 400 and list(answer.json()) == ["error"]


def _multipart(files) -> tuple[bytes, str]:
    from urllib3 import encode_multipart_formdata

    return encode_multipart_formdata([("file", item) for item in files])


def _bad_requests(tmp: Path):
    """(what, keyword arguments of requests.post to /score, query, status, error text); a 422
    is a request of one bad file, which is also that file's entry."""
    too_large = ("big.jpg", os.urandom(MAX_UPLOAD_MB * 2**20 + 1024))
    body, content_type = _multipart([too_large])
    streamed = {
        "data": (body[i : i + 65536] for i in range(0, len(body), 65536)),
        "headers": {"Content-Type": content_type},
    }  # chunked: no Content-Length
    photo = ("ok.png", (ROOT / "examples" / "images" / "chelsea.png").read_bytes())
    return [
        ("no body", {}, "", 400, "no file"),
        ("a form without a file field", {"files": {"photo": photo}}, "", 400, "no file"),
        (
            "a text field named file",
            {"files": {"file": (None, "hello")}},
            "",
            400,
            "holds text, not a file",
        ),
        ("JSON instead of a form", {"json": {"file": "x"}}, "", 400, "no file"),
        (
            "an empty file",
            {"files": {"file": ("empty.jpg", b"")}},
            "",
            422,
            "empty.jpg: empty file",
        ),
        (
            "not an image",
            {"files": {"file": ("notes.jpg", b"just some text\n" * 40)}},
            "",
            422,
            "notes.jpg: not an image",
        ),
        (
            "a truncated image",
            {"files": {"file": _read(write_truncated_jpeg(tmp))}},
            "",
            422,
            "truncated.jpg: truncated",
        ),
        (
            "a decompression bomb",
            {"files": {"file": _read(write_bomb_png(tmp))}},
            "",
            422,
            "bomb.png: decompression bomb",
        ),
        (
            "an upload over --max-upload-mb",
            {"files": {"file": too_large}},
            "",
            413,
            f"limit of {MAX_UPLOAD_MB} MiB",
        ),
        ("the same, streamed", streamed, "", 413, f"limit of {MAX_UPLOAD_MB} MiB"),
        (
            "an unknown model",
            {"files": {"file": photo}},
            "?model=nope",
            400,
            "unknown model 'nope'",
        ),
        (
            "a model not served",
            {"files": {"file": photo}},
            "?model=memnet",
            400,
            "'memnet' is not served here",
        ),
        (
            "a bad decode option",
            {"files": {"file": photo}},
            "?fast_decode=maybe",
            400,
            "fast_decode",
        ),
        (
            "max_pixels above the server's",
            {"files": {"file": photo}},
            "?max_pixels=10000000000",
            400,
            "max_pixels",
        ),
        (
            "max_pixels below the image",
            {"files": {"file": photo}},
            "?max_pixels=1000",
            422,
            "decompression bomb",
        ),
    ]


@pytest.mark.slow
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_answering(
    server, tmp_path, example_images
):
    import requests

    good = [_read(example_images[0])]
    for what, kwargs, query, status, error in _bad_requests(tmp_path):
        answer = requests.post(f"{server.url}/score{query}", timeout=120, **kwargs)
        assert answer.status_code == status, (what, answer.status_code, answer.text)
        body = answer.json()
        assert error in body["error"], (what, body)
        if status == 422:  # the file's own entry: its error without its name
            [entry] = body.pop("images")
            name, text = error.split(": ", 1) if ": " in error else (None, error)
            assert entry["file"] == (name or entry["file"]) and text in entry["error"], (
                what,
                entry,
            )
            assert body["error"] == f"{entry['file']}: {entry['error']}", (what, body)
        assert list(body) == ["error"], (what, body)
        after = _post(server.url, good)
        assert after.status_code == 200 and "memorability" in after.json()["images"][0], what
    missing = requests.get(f"{server.url}/no-such-page", timeout=30)
    assert missing.status_code == 404 and list(missing.json()) == ["error"]


@pytest.mark.slow
def test_models_lists_the_served_models_and_the_registry(server):
    import requests

    from memscore.models.registry import registry_table

    models = requests.get(f"{server.url}/models", timeout=30).json()
    assert [m["model"] for m in models["served"]] == list(MODELS)
    resmem = models["served"][0]
    assert resmem["output_column"] == "memorability" and resmem["usual_min"] == 0.41
    assert "0.41" in resmem["notes"] and len(resmem["weights_sha256"]) == 64
    assert models["registry"] == registry_table() and models["device"] == "cpu"


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1100,900",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_the_page_shows_the_json_score_of_an_uploaded_image(
    server, browser, tmp_path, example_images
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path = example_images[2]
    [expected] = _post(server.url, [_read(path)]).json()["images"]
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: "resmem" in d.find_element(By.ID, "served").text)
    browser.find_element(By.ID, "file-input").send_keys(str(path))
    card = WebDriverWait(browser, 120).until(
        lambda d: d.find_element(By.CSS_SELECTOR, ".card[data-state]")
    )
    assert card.get_attribute("data-state") == "scored", card.text
    shown = {
        score.get_attribute("data-column"): score
        for score in card.find_elements(By.CSS_SELECTOR, ".score")
    }
    assert set(shown) == set(SCORE_COLUMNS.values())
    for column, score in shown.items():
        assert score.text == f"{expected[column]:.4f}"  # what a person reads
        assert float(score.get_attribute("data-value")) == expected[column]
    assert path.name in card.text and f"{expected['width']}×{expected['height']}" in card.text
    assert "rarely fall below about 0.41" in card.text
    screenshot = tmp_path / "page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000


@pytest.mark.slow
def test_maps_true_answers_each_scores_map_and_the_page_draws_it_over_the_thumbnail(
    server, browser, example_images, batch_scores
):
    """``?maps=true``: the map of each model that has maps (``<score>_map``, 16 x 16, as
    ``memscore score --maps`` writes it; FalseResMem declares none) and where it lies on the
    image, every score unchanged; a request for maps of no model that has them is a 400. On the
    page, the maps option draws the map over the thumbnail; its button hides and shows it."""
    import requests
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    answer = _post(server.url, [_read(p) for p in example_images[:2]], "?maps=true")
    assert answer.status_code == 200, answer.text
    for image in answer.json()["images"]:
        _check_scores(image, batch_scores[image["file"]])
        cells = np.array(image["memorability_map"], np.float32)
        assert cells.shape == (256,) and np.isfinite(cells).all()
        assert cells.max() == 1 and cells.min() == 0
        assert cells.std() > 0.05
        assert image["map_boxes"] == {
            "memorability_map": pytest.approx([14 / 256, 14 / 256, 241 / 256, 241 / 256])
        }
        assert "false_alarm_map" not in image
    plain = _post(server.url, [_read(example_images[0])]).json()["images"][0]
    assert "memorability_map" not in plain and "map_boxes" not in plain
    refused = requests.post(
        f"{server.url}/score?maps=true&model=falseresmem",
        files=[("file", _read(example_images[0]))],
    )
    assert refused.status_code == 400
    assert "falseresmem declares no layers for Grad-CAM" in refused.json()["error"]

    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: "resmem" in d.find_element(By.ID, "served").text)
    browser.find_element(By.TAG_NAME, "summary").click()
    browser.find_element(By.ID, "maps").click()
    browser.find_element(By.ID, "file-input").send_keys(str(example_images[2]))
    card = WebDriverWait(browser, 120).until(
        lambda d: d.find_element(By.CSS_SELECTOR, ".card[data-map]")
    )
    assert card.get_attribute("data-state") == "scored", card.text
    assert card.get_attribute("data-map") == "memorability_map"  # the first served model's
    canvas = card.find_element(By.CSS_SELECTOR, "canvas.map")
    # the map is drawn: coloured, opaque pixels inside the crop, none outside the image's box
    drawn = browser.execute_script(
        "const c = arguments[0].getContext('2d').getImageData(0, 0, 132, 132).data;"
        "let n = 0; for (let i = 3; i < c.length; i += 4) if (c[i] > 0) n++; return n;",
        canvas,
    )
    assert drawn > 0.3 * 132 * 132, drawn
    toggle = card.find_element(By.CSS_SELECTOR, ".map-toggle")
    toggle.click()
    assert not canvas.is_displayed() and toggle.text == "show map"
    toggle.click()
    assert canvas.is_displayed() and toggle.text == "hide map"


@dataclasses.dataclass
class Joined:
    cluster_address: str
    gpu_node_id: str
    server: Server


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    """``memscore serve --address`` (ResMem) joined to a two-node Ray cluster of its own whose
    worker has a GPU (as Ray counts it: this machine has no CUDA, so torch scores on the CPU):
    the model replica runs there, the ingress on the head. Fresh, so its counters start at 0.
    The last test that uses it stops it."""
    import ray
    from ray.cluster_utils import Cluster
    from test_multinode import private_ray_tmpdir

    ray.shutdown()  # the session's local Ray, if a test before started it
    with private_ray_tmpdir():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
            cluster.wait_for_nodes()
            started = _start_server(
                tmp_path_factory.mktemp("joined"), "--address", cluster.address, "--model", "resmem"
            )
            try:
                yield Joined(cluster.address, gpu_node.node_id, started)
            finally:
                _stop_server(started.process)
        finally:
            cluster.shutdown()


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _metric(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` with these labels (one per replica) in Prometheus
    text, or None where there is none."""
    values = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        series, value = line.rsplit(" ", 1)
        have = dict(_LABEL.findall(series[len(name) :]))
        if all(have.get(key) == wanted for key, wanted in labels.items()):
            values.append(float(value))
    return sum(values) if values else None


def _wait_for_metrics(url: str, wanted: dict, since: float, timeout_s: float = 120):
    """Poll ``/metrics`` until every ``(name, labels)`` of ``wanted`` has reached its count
    (Ray's metrics agents export what a process counted some seconds later); -> (the text, the
    seconds from ``since`` to the first poll that had them all)."""
    import requests

    while True:
        text = requests.get(f"{url}/metrics", timeout=30).text
        seen = {key: _metric(text, key[0], **dict(key[1])) for key in wanted}
        if all(value is not None and value >= wanted[key] for key, value in seen.items()):
            return text, time.time() - since
        assert time.time() - since < timeout_s, f"not exported in {timeout_s} s: {seen}"
        time.sleep(0.5)


@pytest.mark.slow
def test_metrics_count_files_errors_by_kind_images_and_model_seconds_on_every_node(
    joined, tmp_path, example_images
):
    """The counters of a fresh server are exactly its requests', the model replica's (images,
    batches, seconds) read from the worker node's metrics agent, the ingress's (files, errors)
    from the head's."""
    import requests

    url = joined.server.url
    empty, notes, truncated, _ = _bad_files(tmp_path)
    before = requests.get(f"{url}/metrics", timeout=30).text
    assert "memscore_files_total{" not in before, "not a fresh server"
    good = [_read(example_images[0]), _read(example_images[1])]
    assert _post(url, [good[0], _read(notes), good[1]]).status_code == 200
    assert _post(url, [_read(empty), _read(truncated)]).status_code == 422
    assert _post(url, good, "?model=nope").status_code == 400  # refused: no file counted
    answered = time.time()
    resmem = (("model", "resmem"),)
    exact = {
        ("memscore_files_total", ()): 5,
        ("memscore_images_scored_total", resmem): 2,
        **{
            ("memscore_errors_total", (("kind", kind),)): 1
            for kind in ("not an image", "empty file", "truncated")
        },
    }
    batches, seconds = (
        ("memscore_model_batches_total", resmem),
        ("memscore_model_seconds_total", resmem),
    )
    text, delay = _wait_for_metrics(url, {**exact, batches: 1, seconds: 1e-9}, since=answered)
    print(f"memscore's counters shown {delay:.1f} s after the last answer")
    assert {key: _metric(text, key[0], **dict(key[1])) for key in exact} == exact
    assert _metric(text, "memscore_errors_total") == 3  # no other kind
    # two images, in one forward pass or two, each well under a minute on this CPU
    passes = _metric(text, batches[0], **dict(batches[1]))
    assert passes in (1, 2)
    assert 0 < _metric(text, seconds[0], **dict(seconds[1])) < 60 * passes
    for name in (
        "memscore_files_total",
        "memscore_errors_total",
        "memscore_images_scored_total",
        "memscore_model_batches_total",
        "memscore_model_seconds_total",
    ):
        assert text.count(f"# TYPE {name} counter\n") == 1, name
    assert "ray_memscore" not in text and "ray_serve_" in text


@pytest.mark.slow
def test_the_page_shows_a_bad_files_error_in_its_card_beside_the_good_files_scores(
    server, browser, tmp_path, example_images
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    notes = _bad_files(tmp_path)[1]
    paths = [example_images[0], notes, example_images[4]]
    expected = {path.name: _post(server.url, [_read(path)]).json()["images"][0] for path in paths}
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: "resmem" in d.find_element(By.ID, "served").text)
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(path) for path in paths))
    WebDriverWait(browser, 120).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card[data-state]")) == len(paths)
    )
    cards = {
        card.find_element(By.CSS_SELECTOR, ".name").text: card
        for card in browser.find_elements(By.CSS_SELECTOR, ".card")
    }
    assert set(cards) == {path.name for path in paths}
    bad = cards[notes.name]
    assert bad.get_attribute("data-state") == "error", bad.text
    # the file's own entry, as the API gives it: "kind: detail"
    assert bad.find_element(By.CSS_SELECTOR, ".error").text == expected[notes.name]["error"]
    assert expected[notes.name]["error"].startswith("not an image: ")
    assert not bad.find_elements(By.CSS_SELECTOR, ".score")
    for path in (example_images[0], example_images[4]):
        card = cards[path.name]
        assert card.get_attribute("data-state") == "scored", card.text
        assert not card.find_elements(By.CSS_SELECTOR, ".error")
        shown = {
            score.get_attribute("data-column"): float(score.get_attribute("data-value"))
            for score in card.find_elements(By.CSS_SELECTOR, ".score")
        }
        assert set(shown) == set(SCORE_COLUMNS.values())
        for column, value in shown.items():  # the page's requests may share a forward pass
            assert abs(value - expected[path.name][column]) <= 1e-6, (path.name, column)
    screenshot = tmp_path / "page-with-a-bad-file.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000


@pytest.mark.slow
def test_joining_a_cluster_the_model_replica_takes_a_gpu_and_ctrl_c_leaves_the_cluster_up(
    joined, example_images, batch_scores
):
    """``--address``: the model replica lands on the worker with a GPU, with a GPU of its own;
    Ctrl-C deletes the application and nothing else. Last of the tests on ``joined``."""
    import ray
    import requests
    from ray import serve

    models = requests.get(f"{joined.server.url}/models", timeout=30).json()
    assert models["node_id"] == joined.gpu_node_id and models["gpu_ids"] == ["0"]
    [image] = _post(joined.server.url, [_read(example_images[1])]).json()["images"]
    _check_scores(image, batch_scores[example_images[1].name], models=("resmem",))
    assert _stop_server(joined.server.process) == 0
    assert "memscore serve: stopped" in joined.server.log.read_text()
    ray.init(address=joined.cluster_address, log_to_driver=False)
    try:
        assert "memscore" not in serve.status().applications  # deleted, only that
        assert sum(node["Alive"] for node in ray.nodes()) == 2  # the cluster is up
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ctrl_c_stops_the_server_cleanly(server):
    """Last in this file: it stops the module's server."""
    import requests

    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=120) == 0
    log = server.log.read_text()
    assert "memscore serve: stopping" in log and "memscore serve: stopped" in log
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/healthz", timeout=10)
