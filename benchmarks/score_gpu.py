"""GPU benchmark of ResMem's model stage and of batched GPU JPEG decode, needing only torch.

Runs on a bare GPU machine with nothing but torch, torchvision, Pillow and numpy: no Ray, no
memscore dependencies, no ``resmem`` package. The model is the real architecture, imported
from this repository (``memscore/models/resmem.py``, which needs only torch and torchvision),
with seeded random weights, unless ``--weights`` names a ResMem state_dict file (the published
``resmem/model.pt`` loads strictly). It writes one Markdown file with:

1. **Model stage**, images/s at batch 64, 128 and 256 (median of several timed batches after a
   warm-up, ``torch.cuda.synchronize`` around each): fp32 with TF32 off, PyTorch's defaults
   (cuDNN may use TF32 for convolutions: what memscore runs today), TF32 for convolutions and
   matmuls, bf16 and fp16 autocast, and bf16/fp16 weights, each in NCHW and channels_last, plus
   cudnn.benchmark variants. The input is built as the real pipeline builds it: a uint8 NHWC
   batch, ``float / 255``, channels_last where the row says so.
2. **Score difference** of each configuration against fp32 (TF32 off, NCHW) on the same inputs:
   crops of the photos in ``examples/images`` through memscore's own ResMem preprocessing.
   Max absolute difference of the sigmoid scores and of the logit before the sigmoid, and the
   Spearman correlation of the scores, and the relative difference of the head's input
   features. Random weights give nearly the same output for every input, so, unless
   ``--weights`` is given, the BatchNorm statistics are first set from those photo crops and
   the head is initialised from them so that the logits have mean 0 and standard deviation 1
   across them (see ``calibrate``). Real weights may well behave differently: the score
   differences to publish are the ones measured with ``--weights``.
3. **Host to scores** (CUDA only): the model stage as ``memscore.stages.predict.ScoreImages`` runs it
   (float conversion on the CPU, a pinned copy, non-blocking transfer) against copying uint8 and
   converting on the GPU.
4. **JPEG decode**: torchvision's batched ``decode_jpeg(..., device="cuda")`` plus a resize and
   crop on the GPU, against Pillow's decode plus memscore's ResMem preprocessing on one CPU core
   (CPU time of this process; the machine's core count beside it), for JPEGs of several sizes
   made from ``examples/images``.

    python benchmarks/score_gpu.py                            # on a GPU: benchmarks/GPU_RESULTS.md
    python benchmarks/score_gpu.py --weights resmem/model.pt  # score differences, real weights
    python benchmarks/score_gpu.py --quick --results /tmp/gpu.md  # CPU smoke test, 1-2 min

Without CUDA the default results file is refused (it holds GPU figures); pass ``--results``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import io
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "GPU_RESULTS.md"
#: The real photos the inputs are made from (camera.png is greyscale; it is converted to RGB as
#: the decode stage converts every image).
PHOTOS = tuple(
    ROOT / "examples" / "images" / name
    for name in ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg")
)
#: What the GPU should reach in bf16 on an H100/H200-class chip (issue 16): about a third of the
#: dense bf16 peak at 27.2 GFLOP per image.
TARGET = 10_000


@dataclass(frozen=True)
class Config:
    """One row of the model-stage table."""

    name: str
    precision: str  # fp32 | default | tf32 | bf16 | fp16 (autocast) | bf16w | fp16w (weights)
    channels_last: bool
    cudnn_benchmark: bool = False
    cuda_only: bool = False


#: The reference row, against which score differences are measured, comes first.
CONFIGS = (
    Config("fp32, TF32 off, NCHW (reference)", "fp32", False),
    Config("fp32, TF32 off, channels_last", "fp32", True),
    Config(
        "PyTorch defaults (cuDNN TF32 convs), channels_last: memscore today",
        "default",
        True,
        cuda_only=True,
    ),
    Config("TF32 convs + matmuls, NCHW", "tf32", False, cuda_only=True),
    Config("TF32 convs + matmuls, channels_last", "tf32", True, cuda_only=True),
    Config("bf16 autocast, NCHW", "bf16", False),
    Config("bf16 autocast, channels_last", "bf16", True),
    Config("fp16 autocast, NCHW", "fp16", False),
    Config("fp16 autocast, channels_last", "fp16", True),
    Config("bf16 weights + input (no autocast), channels_last", "bf16w", True),
    Config("fp16 weights + input (no autocast), channels_last", "fp16w", True),
    Config("bf16 autocast, channels_last, cudnn.benchmark", "bf16", True, True, cuda_only=True),
    Config("bf16 weights, channels_last, cudnn.benchmark", "bf16w", True, True, cuda_only=True),
)
#: PyTorch's own settings, read before anything changes them: the "PyTorch defaults" row.
DEFAULT_FLAGS = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
HALF = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "bf16w": torch.bfloat16,
    "fp16w": torch.float16,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results",
        default=None,
        help="Markdown file to write (default benchmarks/GPU_RESULTS.md, only when CUDA is used)",
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny batches and few iterations: a CPU smoke test of the script",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="model-stage batch sizes (default 64 128 256; --quick: 1)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="timed batches per measurement (default 10; --quick: 1)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed batches before each measurement (default 3; --quick: 0)",
    )
    parser.add_argument(
        "--score-images",
        type=int,
        default=None,
        help="photo crops the score differences are measured on (default 256; --quick: 2)",
    )
    parser.add_argument(
        "--decode-sizes",
        nargs="+",
        default=["500x375", "1024x768", "2048x1536"],
        help="JPEG sizes WIDTHxHEIGHT for the decode comparison",
    )
    parser.add_argument(
        "--decode-images",
        type=int,
        default=None,
        help="JPEGs per size (default 128, one GPU batch; --quick: 4)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="a ResMem state_dict file (e.g. resmem/model.pt), loaded strictly; "
        "default: seeded random weights",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    for name, full, small in (
        ("batch_sizes", [64, 128, 256], [1]),
        ("iterations", 10, 1),
        ("warmup", 3, 0),
        ("score_images", 256, 2),
        ("decode_images", 128, 4),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.decode_sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.decode_sizes]
    return args


# ---------------------------------------------------------------------------------------- inputs


def _resmem():
    """memscore's ResMem class and its preprocessing; the repository root goes on sys.path.

    ``memscore.models.resmem`` imports torch, torchvision and memscore's own registry and
    transforms (numpy only); importing ``memscore`` itself imports only its config module.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from memscore.models.resmem import ResMem
    from memscore.models.transforms import ImagePreprocess

    return ResMem, ImagePreprocess()


def _sources() -> list:
    from PIL import Image

    out = []
    for path in PHOTOS:
        with Image.open(path) as image:
            out.append(image.convert("RGB"))
    return out


def photo_crops(n: int, seed: int, preprocess) -> np.ndarray:
    """``n`` random crops (at least half of each side, some mirrored) of the example photos,
    through memscore's ResMem preprocessing: uint8 (n, 227, 227, 3)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = _sources()
    out = np.empty((n, *preprocess.array_shape), dtype=np.uint8)
    for i in range(n):
        image = sources[i % len(sources)]
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = preprocess.to_array(crop)
    return out


def make_jpegs(size: tuple[int, int], seed: int) -> list[bytes]:
    """One JPEG per example photo at ``size`` (centre-cut to its aspect ratio, Lanczos, light
    noise so it compresses like a photo rather than a smooth upscale, quality 90, 4:2:0)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    out = []
    for image in _sources():
        w, h = image.size
        if w / h > width / height:
            cw, ch = int(h * width / height), h
        else:
            cw, ch = w, int(w * height / width)
        box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        pixels = np.asarray(image.crop(box).resize(size, Image.LANCZOS), dtype=np.int16)
        pixels = pixels + rng.normal(0.0, 3.0, pixels.shape).astype(np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            buffer, "JPEG", quality=90, subsampling=2
        )
        out.append(buffer.getvalue())
    return out


# ----------------------------------------------------------------------------------------- model


def build_model(
    args, photos: np.ndarray, preprocess, device: torch.device
) -> tuple[nn.Module, str]:
    """ResMem with ``--weights``, or seeded random weights calibrated on ``photos`` (the images
    the score differences are measured on) to give scores that depend on the image."""
    ResMem, _ = _resmem()
    torch.manual_seed(args.seed)
    model = ResMem()
    if args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        return model.eval(), f"weights from `{args.weights}` (loaded strictly)"
    before = calibrate(model, preprocess.to_tensor(photos).to(device))
    return model.eval(), (
        f"random weights (`torch.manual_seed({args.seed})`), BatchNorm statistics set from "
        f"the {len(photos)} photo crops of the score differences, and the fully connected head "
        f"initialised from them (each unit to mean 0, each layer to variance 1 across images; "
        f"the logits' standard deviation "
        f"across images was {before:.2g} before)"
    )


#: ResMem's fully connected head in forward order: each but the last is followed by a ReLU (and,
#: in training only, dropout); see ``_head`` in memscore/models/resmem.py.
HEAD = ("fc6", "fc7", "fc8", "fc9", "fc10", "fc11", "fc12")


def calibrate(model: nn.Module, batch: torch.Tensor) -> float:
    """Make a randomly initialised ResMem behave like a trained one in scale, from ``batch``.

    With PyTorch's default initialisation the head's biases swamp its input: the logit hardly
    depends on the image (its standard deviation across images is about 1e-4), so any rounding
    would look large beside it. So: (1) BatchNorm running statistics from a train-mode forward
    (cumulative average); (2) a data-dependent initialisation of the head (Kraehenbuehl et al.,
    2016): each fully connected layer's units are shifted to mean 0 over ``batch`` and the
    layer scaled to a mean variance of 1 across images, the last one included, so the logits
    have mean 0 and standard deviation 1 and the scores spread over about 0.2-0.8 (on images
    like ``batch``). Returns the logits' standard
    deviation across ``batch`` before (2).
    """
    model.to(batch.device)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    features = {}

    def keep(module, inputs, output) -> None:  # None: the output is left as it is
        features["x"] = inputs[0]

    hook = model.fc6.register_forward_hook(keep)
    with torch.no_grad():
        model(batch)
        model.eval()
        model(batch)
        hook.remove()

        def head(x, standardise):
            for name in HEAD:
                layer = getattr(model, name)
                z = layer(x)
                if standardise:
                    # one scale per layer: a unit's own spread over a small batch can be ~0
                    mean, std = z.mean(0), z.var(0).mean().sqrt().clamp_min(1e-12)
                    layer.weight.div_(std)
                    layer.bias.sub_(mean).div_(std)
                    z = layer(x)
                x = F.relu(z) if name != HEAD[-1] else z
            return x

        before = float(head(features["x"], standardise=False).std())
        head(features["x"], standardise=True)
    model.cpu()
    return before


class Logits:
    """Of the last forward, as float32: ``value``, the logit before the sigmoid (``fc12``'s
    output), and ``features``, the head's input (the two branches' 9216 + 1000 features)."""

    def __init__(self, model: nn.Module) -> None:
        self.value = self.features = None
        self._hooks = (
            model.fc12.register_forward_hook(self._keep),
            model.fc6.register_forward_hook(self._keep_features),
        )

    def _keep(self, module, inputs, output) -> None:
        self.value = output.detach().float().reshape(-1)

    def _keep_features(self, module, inputs, output) -> None:
        self.features = inputs[0].detach().float()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def count_gflop(model: nn.Module) -> float:
    """GFLOP of one 227x227 image's forward (convolutions and matmuls, multiply-adds as two)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, 227, 227))
    return counter.get_total_flops() / 1e9


@contextlib.contextmanager
def precision(config: Config, device: torch.device):
    """The backend flags and autocast of ``config``; PyTorch's defaults are restored after."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    if config.precision in ("fp32", "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = config.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = config.precision == "tf32"
    torch.backends.cudnn.benchmark = config.cudnn_benchmark
    try:
        if config.precision in ("bf16", "fp16"):
            with torch.autocast(device.type, dtype=HALF[config.precision]):
                yield
        else:
            yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = saved


def prepared(base: nn.Module, config: Config, device: torch.device) -> nn.Module:
    model = copy.deepcopy(base).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.precision in ("bf16w", "fp16w"):
        model = model.to(HALF[config.precision])
    return model


def to_input(pixels: torch.Tensor, config: Config) -> torch.Tensor:
    """uint8 NHWC on the device -> the model's input, as ``ImagePreprocess.to_tensor`` makes it."""
    batch = pixels.permute(0, 3, 1, 2).to(torch.float32).div(255)
    if config.precision in ("bf16w", "fp16w"):
        batch = batch.to(HALF[config.precision])
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    return batch.contiguous(memory_format=layout)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step, warmup: int, iterations: int, device: torch.device) -> float:
    """Median wall time of ``step()`` over ``iterations`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def failure(error: BaseException) -> str:
    """What a report cell says about a failed measurement: the error's first line, shortened."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"failed: {text[:70]}"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable") for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def model_stage(args, base: nn.Module, photos: np.ndarray, device: torch.device) -> dict:
    """Images/s per configuration and batch size, and score differences against fp32."""
    generator = torch.Generator().manual_seed(args.seed + 2)
    random_pixels = {
        b: torch.randint(0, 256, (b, 227, 227, 3), dtype=torch.uint8, generator=generator).to(
            device
        )
        for b in args.batch_sizes
    }
    photo_pixels = torch.from_numpy(photos).to(device)
    rates, diffs, reference = {}, {}, None
    for config in CONFIGS:
        if config.cuda_only and device.type != "cuda":
            continue
        # A configuration that fails (an op without a half kernel, out of memory) is a row of
        # the report, not the end of a run on a GPU that is lent for minutes.
        try:
            model = prepared(base, config, device)
            logits = Logits(model)
            with torch.inference_mode(), precision(config, device):
                scores = model(to_input(photo_pixels, config)).float().cpu().numpy()
                z, f = logits.value.cpu().numpy(), logits.features.cpu().numpy()
                if reference is None:
                    reference = scores, z, f
                diffs[config.name] = {
                    "score": float(np.max(np.abs(scores - reference[0]))),
                    "logit": float(np.max(np.abs(z - reference[1]))),
                    # the backbone's rounding alone, whatever the head makes of it
                    "features": float(
                        np.max(
                            np.linalg.norm(f - reference[2], axis=1)
                            / np.linalg.norm(reference[2], axis=1)
                        )
                    ),
                    "spearman": spearman(scores, reference[0]),
                    "finite": bool(np.isfinite(scores).all()),
                }
                for b in args.batch_sizes:
                    x = to_input(random_pixels[b], config)
                    try:
                        seconds = median_seconds(
                            functools.partial(model, x), args.warmup, args.iterations, device
                        )
                        rates[config.name, b] = b / seconds
                    except RuntimeError as error:
                        rates[config.name, b] = failure(error)
                    del x
            logits.close()
            del model
        except (RuntimeError, NotImplementedError) as error:
            if reference is None:
                raise
            diffs[config.name] = failure(error)
            for b in args.batch_sizes:
                rates[config.name, b] = diffs[config.name]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(
            f"{config.name}: "
            + ", ".join(f"batch {b}: {fmt(rates[config.name, b], 1)}" for b in args.batch_sizes),
            flush=True,
        )
    return {"rates": rates, "diffs": diffs, "reference": reference}


def host_to_scores(
    args, base: nn.Module, preprocess, device: torch.device, configs: list[Config]
) -> list[tuple[str, str, float]]:
    """The whole model stage from uint8 numpy pixels to scores on the host, at the largest batch,
    three ways. (a) is ``ScoreImages._to_device`` in ``memscore/stages/predict.py``."""
    if device.type != "cuda":
        return []
    b = max(args.batch_sizes)
    pixels = np.random.default_rng(args.seed + 3).integers(0, 256, (b, 227, 227, 3), np.uint8)
    pinned = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    rows = []
    for config in configs:
        model = prepared(base, config, device)

        def as_predict_py(model=model, config=config):
            batch = preprocess.to_tensor(pixels, memory_format=torch.channels_last)
            if config.precision in ("bf16w", "fp16w"):
                batch = batch.to(HALF[config.precision])
            batch = batch.pin_memory().to(device, non_blocking=True)
            return model(batch).float().cpu().numpy()

        def uint8_copy(model=model, config=config):
            batch = torch.from_numpy(pixels).pin_memory().to(device, non_blocking=True)
            return model(to_input(batch, config)).float().cpu().numpy()

        def uint8_reused_buffer(model=model, config=config):
            pinned.numpy()[...] = pixels
            batch = pinned.to(device, non_blocking=True)
            return model(to_input(batch, config)).float().cpu().numpy()

        with torch.inference_mode(), precision(config, device):
            for label, step in (
                (
                    "(a) float32 on the CPU, pinned copy (memscore.stages.predict today)",
                    as_predict_py,
                ),
                ("(b) uint8 pinned copy, float conversion on the GPU", uint8_copy),
                ("(c) as (b), one reused pinned buffer", uint8_reused_buffer),
            ):
                try:
                    seconds = median_seconds(step, args.warmup, args.iterations, device)
                    rows.append((config.name, label, b / seconds))
                except RuntimeError as error:
                    rows.append((config.name, label, failure(error)))
        del model
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------- decode


def decode(args, preprocess, device: torch.device) -> list[dict]:
    """Pillow + ResMem preprocessing on one core against batched nvJPEG decode + resize/crop."""
    from PIL import Image

    rows = []
    for size in args.decode_sizes:
        distinct = make_jpegs(size, args.seed + 4)
        files = [distinct[i % len(distinct)] for i in range(args.decode_images)]
        row = {"size": size, "kb": sum(map(len, distinct)) / len(distinct) / 1024}
        for f in files[:2]:  # warm-up: Pillow's first use loads its plugins
            preprocess.to_array(Image.open(io.BytesIO(f)).convert("RGB"))
        cpu, wall = time.process_time(), time.perf_counter()
        pillow = [preprocess.to_array(Image.open(io.BytesIO(f)).convert("RGB")) for f in files]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        row["pillow_cpu_ms"] = 1000 * cpu / len(files)
        row["pillow_per_core"] = len(files) / cpu
        row["pillow_wall"] = len(files) / wall
        if device.type == "cuda":
            try:
                row.update(gpu_decode(args, files, pillow, device))
            except (RuntimeError, ValueError) as error:  # e.g. a torchvision built without nvJPEG
                row["gpu_decode"] = row["gpu_decode_resize"] = failure(error)
        rows.append(row)
        print(
            f"decode {size[0]}x{size[1]}: Pillow {row['pillow_per_core']:.1f}/s per core"
            + (f", GPU {fmt(row['gpu_decode'])}/s" if "gpu_decode" in row else ""),
            flush=True,
        )
    return rows


def gpu_decode(args, files: list[bytes], pillow: list[np.ndarray], device: torch.device) -> dict:
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]

    def decode_only():
        return decode_jpeg(data, device=device)

    def decode_resize():
        images = torch.stack(decode_jpeg(data, device=device))
        images = TF.resize(images, [256, 256], antialias=True)
        return TF.center_crop(images, [227, 227])

    out = {}
    for key, step in (("gpu_decode", decode_only), ("gpu_decode_resize", decode_resize)):
        cpu = time.process_time()
        seconds = median_seconds(step, args.warmup, args.iterations, device)
        cpu = time.process_time() - cpu
        out[key] = len(files) / seconds
        out[key + "_cpu_ms"] = 1000 * cpu / (len(files) * (args.warmup + args.iterations))
    gpu = decode_resize().permute(0, 2, 3, 1).cpu().numpy().astype(np.int16)
    delta = np.abs(gpu - np.stack(pillow).astype(np.int16))
    out["pixel_mean"], out["pixel_max"] = float(delta.mean()), int(delta.max())
    return out


# --------------------------------------------------------------------------------------- report


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine(device: torch.device) -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = (
            f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability "
            f"{p.major}.{p.minor}, {p.multi_processor_count} SMs; CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        gpu = "none (CUDA not available: a CPU run, GPU rows not measured)"
    return [
        f"- GPU: {gpu}",
        f"- CPU: {cpu}, {cores()} cores usable by this process, {torch.get_num_threads()} "
        f"torch threads",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, Python "
        f"{platform.python_version()}, {platform.platform()}; PyTorch's defaults: "
        f"`cudnn.allow_tf32={DEFAULT_FLAGS[0]}`, `cuda.matmul.allow_tf32={DEFAULT_FLAGS[1]}`",
    ]


def fmt(x: float | str | None, digits: int = 0) -> str:
    if x is None:
        return "not measured (no CUDA)"
    if isinstance(x, str):  # a failure
        return x
    return f"{x:,.{digits}f}"


def report(args, argv, device, weights_text, gflop, stage, pipeline, decoded, elapsed) -> str:
    bs, cuda = args.batch_sizes, device.type == "cuda"
    diffs, scores, big = stage["diffs"], stage["reference"][0], max(bs)
    rates = {k: v for k, v in stage["rates"].items() if not isinstance(v, str)}
    best = max((c for c in CONFIGS if (c.name, big) in rates), key=lambda c: rates[c.name, big])
    best_bf16 = max(
        (c for c in CONFIGS if (c.name, big) in rates and "bf16" in c.precision),
        key=lambda c: rates[c.name, big],
        default=best,
    )
    lines = [
        "# GPU benchmark: ResMem's model stage and batched JPEG decode",
        "",
        f"Written by `python benchmarks/score_gpu.py {' '.join(argv)}` on "
        f"{datetime.date.today().isoformat()} in {elapsed:.0f} s"
        + ("" if cuda else "; **a CPU run: the GPU figures of issue 16 are still to be measured**")
        + ".",
        "",
        *machine(device),
        f"- Model: `memscore/models/resmem.py` (the real architecture), {weights_text}; "
        f"{gflop:.1f} GFLOP per image (torch's FLOP counter, multiply-add = 2)",
        f"- Timing: {args.warmup} warm-up and {args.iterations} timed batches per figure, "
        f"{'`torch.cuda.synchronize` after each, ' if cuda else ''}median",
        "",
        "## Headline",
        "",
        f"- Fastest model stage at batch {big}: **{rates[best.name, big]:,.0f} images/s**, "
        f"{best.name} ({rates[best.name, big] * gflop / 1e3:.1f} TFLOP/s); "
        f"score difference against fp32 up to {diffs[best.name]['score']:.2g}"
        f" (random weights{'' if not args.weights else ': no, the given ones'}).",
        f"- Best bf16 at batch {big}: {rates[best_bf16.name, big]:,.0f} images/s "
        f"({best_bf16.name}); the aim on an H100/H200-class GPU is {TARGET:,} images/s"
        + (
            f": **{'met' if rates[best_bf16.name, big] >= TARGET else 'not met'}**."
            if cuda
            else " (not measurable here)."
        ),
    ]
    if decoded and cuda:
        d = next((r for r in decoded if r["size"] == (1024, 768)), decoded[0])
        lines.append(
            f"- JPEG {d['size'][0]}x{d['size'][1]}: GPU decode + resize "
            f"{fmt(d['gpu_decode_resize'])} images/s; Pillow {d['pillow_per_core']:.0f} per core, "
            f"so about {rates[best.name, big] / d['pillow_per_core']:.0f} cores to feed the "
            f"fastest model stage ({cores()} here)."
        )
    lines += [
        "",
        "## Model stage: images/s, inputs already on the device",
        "",
        "A uint8 NHWC batch on the device, `float / 255`, the row's layout, the forward pass "
        "under `torch.inference_mode()`.",
        "",
        "| configuration | " + " | ".join(f"batch {b}" for b in bs) + f" | TFLOP/s at {big} |",
        "| --- | " + " | ".join("---:" for _ in bs) + " | ---: |",
    ]
    for c in CONFIGS:
        measured = [stage["rates"].get((c.name, b)) for b in bs]
        cells = [fmt(r, 1 if isinstance(r, float) and r < 100 else 0) for r in measured]
        tflops = f"{rates[c.name, big] * gflop / 1e3:.2f}" if (c.name, big) in rates else "-"
        lines.append(f"| {c.name} | " + " | ".join(cells) + f" | {tflops} |")
    lines += [
        "",
        f"## Score difference against fp32 (TF32 off, NCHW), on the same {len(scores)} photo crops",
        "",
        f"Crops of `examples/images` through memscore's ResMem preprocessing; the fp32 scores "
        f"span {scores.min():.3f}-{scores.max():.3f} (standard deviation {scores.std():.3f}). "
        + "Features: the head's input (9216 + 1000 values), |difference| / |fp32| per image, "
        "the largest; it is the backbone's rounding, whatever the head makes of it. "
        + (
            "These are the given weights' differences."
            if args.weights
            else "With random weights (see Model above) these show the size of each precision's "
            "rounding, not what the published weights do: a random network's features vary "
            "little from image to image, so its calibrated head magnifies rounding, and the "
            "score columns overstate it. Measure the published weights with `--weights`."
        ),
        "",
        "| configuration | max abs diff, score | max abs diff, logit | features, max relative "
        "diff | Spearman vs fp32 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for c in CONFIGS:
        d = diffs.get(c.name)
        if d is None or isinstance(d, str):
            lines.append(f"| {c.name} | {fmt(d)} | - | - | - |")
        elif not d["finite"]:
            lines.append(f"| {c.name} | non-finite scores | - | - | - |")
        else:
            lines.append(
                f"| {c.name} | {d['score']:.2g} | {d['logit']:.2g} | "
                f"{d['features']:.2g} | {d['spearman']:.6f} |"
            )
    lines += [
        "",
        f"## Host to scores at batch {big}: uint8 pixels in host memory to scores in host memory",
        "",
    ]
    if pipeline:
        lines += ["| configuration | path | images/s |", "| --- | --- | ---: |"]
        lines += [f"| {c} | {p} | {fmt(r)} |" for c, p, r in pipeline]
    else:
        lines.append("Not measured (no CUDA).")
    lines += [
        "",
        "## JPEG decode to the model's 227x227 input",
        "",
        "Pillow: `Image.open(...).convert('RGB')` and memscore's ResMem preprocessing (resize "
        "256x256 bilinear, centre crop 227) on one core, in images per CPU second of this "
        f"process; this machine has {cores()} cores. GPU: `torchvision.io.decode_jpeg(list, "
        f"device='cuda')` on {args.decode_images} files at once, then `resize` (antialiased) "
        "and `center_crop` on the GPU, images/s of wall time; its CPU cost is per image.",
        "",
        "| JPEG (quality 90, 4:2:0) | KiB | Pillow, per core | Pillow, CPU ms/image | "
        f"Pillow x {cores()} cores (est.) | GPU decode | GPU decode + resize/crop | "
        "GPU path, CPU ms/image | pixels vs Pillow, mean / max |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in decoded:
        gpu = [
            fmt(r.get("gpu_decode")),
            fmt(r.get("gpu_decode_resize")),
            fmt(r.get("gpu_decode_resize_cpu_ms"), 2),
            f"{r['pixel_mean']:.2f} / {r['pixel_max']}"
            if "pixel_mean" in r
            else "not measured (no CUDA)",
        ]
        lines.append(
            f"| {r['size'][0]}x{r['size'][1]} | {r['kb']:.0f} | "
            f"{r['pillow_per_core']:.1f} | {r['pillow_cpu_ms']:.1f} | "
            f"{r['pillow_per_core'] * cores():,.0f} | " + " | ".join(gpu) + " |"
        )
    lines += [
        "",
        "GPU-decoded pixels differ from Pillow's (another IDCT and chroma upsampling, "
        "another resize), so a GPU decode path changes scores slightly: measure that with "
        "`--weights` before offering it.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.results is None and device.type != "cuda":
        raise SystemExit(
            f"no CUDA here: pass --results PATH ({DEFAULT_RESULTS.name} holds GPU "
            "figures and a CPU run must not overwrite it)"
        )
    results = Path(args.results) if args.results else DEFAULT_RESULTS
    if device.type == "cpu":
        torch.set_num_threads(cores())
    start = time.perf_counter()

    def done(what: str) -> None:
        print(f"[{time.perf_counter() - start:5.1f} s] {what}", flush=True)

    _, preprocess = _resmem()
    photos = photo_crops(args.score_images, args.seed, preprocess)
    base, weights_text = build_model(args, photos, preprocess, device)
    done(f"model built on {device}: {weights_text}")
    gflop = count_gflop(base)
    done(f"{gflop:.1f} GFLOP per image")
    stage = model_stage(args, base, photos, device)
    done("model stage")
    fastest = [
        c
        for c in CONFIGS
        if c.precision in ("default", "bf16", "bf16w") and c.channels_last and not c.cudnn_benchmark
    ]
    pipeline = host_to_scores(args, base, preprocess, device, fastest)
    done("host to scores")
    decoded = decode(args, preprocess, device)
    done("decode")
    text = report(
        args,
        argv,
        device,
        weights_text,
        gflop,
        stage,
        pipeline,
        decoded,
        time.perf_counter() - start,
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    print(f"wrote {results}")
    return results


if __name__ == "__main__":
    main()
