"""What the memorability traces cost: each traces model against its encoder's plain forward pass.

For each encoder (CLIP ViT-B/32, DINOv2-base, SigLIP base/16-224), built from transformers'
configs at the real Base size with seeded random weights (no weights can be downloaded here, and
speed does not depend on their values), one batch of real photos preprocessed as memscore does
(``HFImagePreprocess``: the paper folders' settings) goes through, in turn:

* ``plain (sdpa)``: the model's forward as one would run it for an embedding
  (``attn_implementation="sdpa"``, no extra outputs);
* ``plain (eager)``: the same forward with eager attention, which the traces need;
* ``traces``: memscore's ``<encoder>-traces`` model: the eager forward with every hidden state,
  token 0's attention row kept by a hook per block, and the six traces computed from them;
* ``trace math``: ``compute_traces`` alone, on the outputs of one such forward.

The variants are timed in rounds, each round running every variant once (so that a slow spell
of a shared machine falls on all of them), after one warm-up round. The table gives each
variant's fastest and median time per batch; images/s and the cost against plain (eager) are
taken from the fastest round, the one least disturbed by other work on the machine (as
``timeit`` advises), with the medians beside them for the spread.

    python benchmarks/traces_cpu.py                      # -> benchmarks/TRACES_RESULTS.md
    python benchmarks/traces_cpu.py --batch 8 --rounds 3 --results /tmp/traces.md
    python benchmarks/traces_cpu.py --device cuda        # the same on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ENCODERS = ("clip", "dinov2", "siglip2")
PHOTOS = sorted(p for p in (ROOT / "examples" / "images").iterdir() if p.suffix in (".png", ".jpg"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch", type=int, default=16, help="images per forward pass (default 16)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds after the warm-up (default 5)"
    )
    parser.add_argument(
        "--encoders",
        default=",".join(ENCODERS),
        help="comma-separated, from clip,dinov2,siglip2 (default: all)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's, every core)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--results",
        default=str(ROOT / "benchmarks" / "TRACES_RESULTS.md"),
        help="Markdown file to write (default benchmarks/TRACES_RESULTS.md)",
    )
    return parser.parse_args(argv)


def batch_of_photos(preprocess, n: int):
    """``n`` images (the example photos, repeated) as the model actor gets them."""
    import numpy as np
    from PIL import Image

    arrays = []
    for i in range(n):
        with Image.open(PHOTOS[i % len(PHOTOS)]) as image:
            arrays.append(preprocess.to_array(image.convert("RGB")))
    return preprocess.to_tensor(np.stack(arrays))


def build(encoder: str, seed: int, attention: str):
    """The Base-size architecture with ``attention``, seeded weights (the same for each
    ``attention``, so the variants run one model)."""
    import torch

    from memscore.models.encoders import random_encoder

    torch.manual_seed(seed)
    model = random_encoder(encoder)
    if attention != "eager":
        model.set_attn_implementation(attention)
    return model


def time_once(fn, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(encoder: str, args, device) -> dict:
    import torch

    from memscore.models import get_model_weights
    from memscore.models.traces import EncoderTraces, compute_traces

    preprocess = get_model_weights(f"{encoder}-traces").DEFAULT.transforms
    pixels = batch_of_photos(preprocess, args.batch).to(device)
    eager = build(encoder, args.seed, "eager").to(device)
    sdpa = build(encoder, args.seed, "sdpa").to(device)
    traces = EncoderTraces(encoder, eager)

    # compute_traces' inputs, once, for timing the math alone
    rows: list = []
    hook = [
        m.register_forward_hook(lambda m, a, o: rows.append(o[1][:, :, 0].float().mean(1)))
        for m in eager.modules()
        if isinstance(m, type(eager)._can_record_outputs["attentions"])
    ]
    with torch.inference_mode():
        hidden = eager(pixel_values=pixels, output_hidden_states=True).hidden_states
    for h in hook:
        h.remove()

    variants = {
        "plain (sdpa)": lambda: sdpa(pixel_values=pixels),
        "plain (eager)": lambda: eager(pixel_values=pixels),
        "traces": lambda: traces(pixels),
        "trace math": lambda: compute_traces(hidden, rows),
    }
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for round_ in range(args.rounds + 1):
            for name, fn in variants.items():
                seconds = time_once(fn, device)
                if round_:  # round 0 warms up (allocator, oneDNN/cuBLAS plans)
                    times[name].append(seconds)
        check = traces(pixels)
    assert all(torch.isfinite(v).all() for v in check.values())
    return {
        "tokens": hidden[0].shape[1],
        "layers": len(hidden) - 1,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "spread": {name: (min(t), max(t)) for name, t in times.items()},
    }


def describe_machine(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {platform.platform()}"
    from score_cpu import machine

    return machine()


def report(results: dict, args, device, load) -> str:
    import torch
    import transformers

    lines = [
        "# Memorability traces: cost against the plain forward pass",
        "",
        f"Measured {dt.date.today().isoformat()} by `python benchmarks/traces_cpu.py "
        f"--batch {args.batch} --rounds {args.rounds} --device {args.device}"
        + (f" --threads {args.threads}" if args.threads else "")
        + "`.",
        "",
        f"- machine: {describe_machine(device)}",
        f"- torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), "
        f"transformers {transformers.__version__}, float32",
        f"- batches of {args.batch} real photos (examples/images, repeated), preprocessed "
        "as memscore does; Base-size encoders from transformers' configs with seeded random "
        "weights (speed does not depend on the values)",
        f"- median of {args.rounds} rounds after a warm-up; each round runs every variant once",
        f"- the machine's 1-minute load average: {load[0][0]:.1f} at the start, "
        f"{load[1][0]:.1f} at the end (other work on it slows every variant alike; the "
        f"ratios are what carries over)",
        "",
        "| encoder | tokens x layers | variant | s / batch: fastest, median (slowest) | "
        "images/s (fastest) | vs plain (eager): fastest, median |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for encoder, r in results.items():
        base_low = r["spread"]["plain (eager)"][0]
        base_median = r["median_s"]["plain (eager)"]
        for name, median in r["median_s"].items():
            low, high = r["spread"][name]
            cost = (
                ""
                if name == "plain (eager)"
                else f"{low / base_low:.2f}x, {median / base_median:.2f}x"
            )
            lines.append(
                f"| {encoder} | {r['tokens']} x {r['layers']} | {name} | "
                f"{low:.3f}, {median:.3f} ({high:.3f}) | {args.batch / low:.1f} "
                f"| {cost} |"
            )
    lines += [
        "",
        "`trace math` is part of `traces`; `traces` minus `plain (eager)` is the whole cost of "
        "the traces (the hidden states kept, the hooks, the math). The scoring job adds decoding "
        "and Parquet around either (benchmarks/RESULTS.md).",
    ]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("traces_cpu.py: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    load_before = os.getloadavg()
    for encoder in args.encoders.split(","):
        print(f"measuring {encoder} ...", file=sys.stderr, flush=True)
        results[encoder] = measure(encoder.strip(), args, device)
    load = (load_before, os.getloadavg())
    text = report(results, args, device, load)
    Path(args.results).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
