"""The reference values of docs/traces.md, recomputed by `memscore evaluate` from the per-image
outputs Takmaz et al. (2025) released with their code (github.com/ecekt/image_memorability_memvis).

The paper's repository holds, for the 10,000 MemCat images in the order of MemCat's CSV, each
trace per layer (``<encoder>_activations_mean.json`` ...: {layer: [one value per image]}), the
MemCat memorability scores in the same order (``memcat_CLIP_memscores_layer_LAST.json``), and the
autoencoder's Spearman rho per epoch and seed (``autoencoder_loss_correlation_stats_*.json``).
This script writes the traces as memscore's list columns (``clip_cls_mean`` ...) in one Parquet
file, runs ``memscore.evaluate`` (``memscore.evaluation.job``) on it with ``--trace-columns all``, and writes a Markdown table
of the values docs/traces.md quotes (the paper's, and memscore's figures on the paper's data with
their bootstrap intervals), and the per-layer figure.

    git clone https://github.com/ecekt/image_memorability_memvis paper
    python benchmarks/paper_reference.py paper    # about a minute

Options: ``--results`` (default benchmarks/PAPER_REFERENCE.md; the figure is written beside it
as paper_reference_layers.png), ``--bootstrap`` (default 1000).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from memscore.evaluation.config import EvaluateConfig  # noqa: E402
from memscore.evaluation.job import evaluate  # noqa: E402

ENCODERS = ("clip", "dinov2", "siglip2")
# The paper's file name for each memscore feature: <encoder>_<file>.json.
PAPER_FILES = {
    "cls_mean": "activations_mean",
    "cls_max": "activations_max",
    "cls_maxabs": "activations_max_abs",
    "cls_delta": "activations_delta",
    "attention_entropy": "attentions_entropy",
    "patch_uniformity": "patch_regularity",
}
TRUTH_FILE = "memcat_CLIP_memscores_layer_LAST.json"
SAE_FILES = {
    "CLIP": "autoencoder_loss_correlation_stats_CLIP_nobatchnosplit1e4.json",
    "SigLIP2": "autoencoder_loss_correlation_stats_SigLIP2_nobatchnosplit1e4.json",
}
# What the paper reports and docs/traces.md quotes: (column, list index, rho).
REFERENCES = (
    ("dinov2_attention_entropy", 10, 0.355),
    ("dinov2_patch_uniformity", 8, -0.334),
    ("clip_cls_mean", 1, 0.360),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paper", type=Path, help="A checkout of ecekt/image_memorability_memvis.")
    parser.add_argument("--results", type=Path, default=HERE / "PAPER_REFERENCE.md")
    parser.add_argument("--bootstrap", type=int, default=1000)
    return parser.parse_args(argv)


def traces_table(paper: Path) -> tuple[pa.Table, pa.Table]:
    """(the traces as memscore writes them, one row per image; the ground truth)."""
    truth = json.loads((paper / TRUTH_FILE).read_text())
    paths = [f"memcat/{i:05d}" for i in range(len(truth))]
    columns = {"path": paths}
    for encoder in ENCODERS:
        for feature, name in PAPER_FILES.items():
            per_layer = json.loads((paper / f"{encoder}_{name}.json").read_text())
            values = np.array([per_layer[str(k)] for k in range(len(per_layer))]).T
            assert values.shape[0] == len(truth), (encoder, feature, values.shape)
            columns[f"{encoder}_{feature}"] = pa.array(list(values), pa.list_(pa.float64()))
    return pa.table(columns), pa.table({"path": paths, "memorability": truth})


def main(args: argparse.Namespace) -> int:
    traces, truth = traces_table(args.paper)
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(traces, f"{tmp}/traces.parquet")
        pq.write_table(truth, f"{tmp}/truth.parquet")
        result = evaluate(
            EvaluateConfig(
                f"{tmp}/traces.parquet",
                f"{tmp}/truth.parquet",
                "memorability",
                f"{tmp}/report",
                trace_columns="all",
                bootstrap=args.bootstrap,
            )
        )
        figure = args.results.parent / "paper_reference_layers.png"
        shutil.copyfile(f"{tmp}/report/layers.png", figure)

    lines = [
        "# The paper's reference values, recomputed by `memscore evaluate`",
        "",
        f"`python benchmarks/paper_reference.py PAPER --bootstrap {args.bootstrap}` on the "
        f"per-image outputs released with Takmaz et al. (2025), "
        f"{truth.num_rows:,} MemCat images; rho with a 95% percentile bootstrap interval "
        f"({args.bootstrap} resamples, seed 0). The figure: "
        f"[{figure.name}]({figure.name}).",
        "",
        "| column | list index (layer) | paper | memscore evaluate on the paper's data |",
        "| --- | ---: | ---: | ---: |",
    ]
    for column, index, paper_rho in REFERENCES:
        layer = result["traces"][column]["layers"][index]
        lo, hi = layer["spearman_ci95"]
        lines.append(
            f"| `{column}` | {index} | {paper_rho:+.3f} | {layer['spearman']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}] |"
        )
    lines += [
        "",
        "| autoencoder | Spearman rho at the last epoch, 5 seeds | mean |",
        "| --- | --- | ---: |",
    ]
    for encoder, name in SAE_FILES.items():
        per_epoch = json.loads((args.paper / name).read_text())
        last = per_epoch[str(max(int(k) for k in per_epoch))]
        lines.append(f"| {encoder} | {', '.join(f'{v:.3f}' for v in last)} | {np.mean(last):.3f} |")
    entropy = [
        (layer["spearman"], encoder, layer["index"])
        for encoder in ENCODERS
        for layer in result["traces"][f"{encoder}_attention_entropy"]["layers"]
        if layer["spearman"] is not None
    ]
    low, high = min(entropy), max(entropy)
    lines += [
        "",
        f"Attention entropy, every layer of every encoder: rho from {low[0]:+.3f} "
        f"({low[1]}, layer {low[2]}) to {high[0]:+.3f} ({high[1]}, layer {high[2]}); "
        f"no layer comes near -0.68.",
        "",
        "Strongest layer of each column:",
        "",
        "| column | list index | rho [95% CI] |",
        "| --- | ---: | ---: |",
    ]
    for column, figures in result["traces"].items():
        best = figures["strongest"]
        lines.append(
            f"| `{column}` | {best['index']} | {best['spearman']:+.3f} "
            f"[{best['spearman_ci95'][0]:+.3f}, {best['spearman_ci95'][1]:+.3f}] |"
        )
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
