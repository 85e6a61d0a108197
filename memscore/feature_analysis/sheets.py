"""Contact sheets as the ResMem paper's fig. 14 and 15, and the run's ``report.md``.

A sheet has one line per channel shown: its rendering (where one was made), then its top-k
dataset images, each as the model saw it (resized and centre-cropped by the model's own
preprocessing), with the channel's name and its Spearman correlation with the score. The
channels shown are the rendered ones, else the 8 most tied to memorability (either sign).

Images are read again by their path (relative paths against the manifest's folder, local or
s3://). A source whose rows have no path (WebDataset shards, images inside a Parquet table) gets
a grey tile naming the row's key instead: reading one sample back out of a shard means reading
the shard.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from memscore import storage

__all__ = ["sheet_png", "report_text"]

TILE = 128
LABEL = 18
SHOWN_WITHOUT_RENDERINGS = 8


def _tile_of(path: str | None, base_dir: str | None, storage_options, preprocess):
    from PIL import Image

    from memscore.stages.fetch import resolve_path

    if path:
        try:
            fs, inner = storage.url_to_fs(resolve_path(path, base_dir), storage_options)
            with fs.open(inner, "rb") as f:
                image = Image.open(io.BytesIO(f.read())).convert("RGB")
            return Image.fromarray(preprocess.to_array(image)).resize((TILE, TILE))
        except Exception:  # noqa: BLE001 (a sheet shows what it can; the tables hold the facts)
            pass
    return Image.new("RGB", (TILE, TILE), (128, 128, 128))


def sheet_png(config, model, layer, top, rho, rendered, keys, key_column, base_dir) -> bytes:
    """One layer's sheet as PNG bytes: ``top`` is its ``TopK``, ``rho`` its channels' Spearman
    with the score, ``rendered`` the run's renderings (with their PNG bytes)."""
    from PIL import Image, ImageDraw

    from memscore.models import get_model_weights

    preprocess = get_model_weights(model).DEFAULT.transforms
    renders = {(r["layer"], r["channel"]): r["png"] for r in rendered}
    shown = [c for (name, c) in renders if name == layer]
    if not shown:
        strength = np.nan_to_num(np.abs(rho), nan=-1.0)
        shown = [int(c) for c in np.argsort(-strength, kind="stable")[:SHOWN_WITHOUT_RENDERINGS]]
    k = top.values.shape[1]
    columns = k + (1 if renders else 0)
    sheet = Image.new("RGB", (columns * TILE, len(shown) * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for line, channel in enumerate(shown):
        y = line * (TILE + LABEL)
        draw.text((4, y + 3), f"{layer}:{channel}  spearman {rho[channel]:+.3f}", fill=(0, 0, 0))
        x = 0
        if renders:
            png = renders.get((layer, channel))
            if png:
                tile = Image.open(io.BytesIO(png)).convert("RGB")
                sheet.paste(tile.resize((TILE, TILE)), (x, y + LABEL))
            x += TILE
        for rank in range(k):
            row = int(top.rows[channel, rank])
            key = keys.get(row)
            path = key if key_column not in (None, "__key__") else None
            sheet.paste(
                _tile_of(path, base_dir, config.storage_options, preprocess), (x, y + LABEL)
            )
            if path is None:
                draw.text(
                    (x + 4, y + LABEL + 4),
                    str(key if key is not None else row),
                    fill=(255, 255, 255),
                )
            x += TILE
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def report_text(config, summary: dict[str, Any], channels, rendered) -> bytes:
    """report.md: the sheets, and per layer the channels most tied to memorability."""
    table = channels.to_pandas()
    lines = [
        f"# Network feature analysis: {summary['model']}",
        "",
        f"Manifest `{summary['manifest']}`: {summary['rows_analysed']} images analysed "
        f"(errors: {summary.get('rows_with_errors') or 0}). A channel's activation is its "
        f"output's {summary['reduce']} over positions; `spearman` is its rank correlation "
        f"with the model's own score over the same images"
        + (
            ", `spearman_truth` with the manifest's measured memorability."
            if config.truth_column
            else "."
        ),
        "",
    ]
    for layer, info in summary["layers"].items():
        part = table[table["layer"] == layer].dropna(subset=["spearman"])
        lines += [f"## {layer} ({info['channels']} channels)", ""]
        sheet = summary["sheets"].get(layer)
        if sheet:
            lines += [f"![{layer}](sheets/{layer}.png)", ""]
        for title, rows in (
            ("most positively tied to memorability", part.nlargest(10, "spearman")),
            ("most negatively tied to memorability", part.nsmallest(10, "spearman")),
        ):
            lines += [
                f"Channels {title}:",
                "",
                "| channel | spearman | spearman_truth | mean | std |",
                "|---:|---:|---:|---:|---:|",
            ]
            for _, r in rows.iterrows():
                lines.append(
                    f"| {r['channel']} | {r['spearman']:+.3f} | {r['spearman_truth']:+.3f} | "
                    f"{r['mean']:.4g} | {r['std']:.4g} |"
                )
            lines.append("")
        mine = [r for r in rendered if r["layer"] == layer]
        if mine:
            lines += [
                "Renderings (activation of the saved PNG vs the channel's best dataset image):",
                "",
                "| channel | rendering | best image | factor | seconds |",
                "|---:|---:|---:|---:|---:|",
            ]
            for r in mine:
                factor = "n/a" if r["factor"] is None else f"{r['factor']:.2f}"
                lines.append(
                    f"| {r['channel']} | {r['activation']:.4g} | "
                    f"{r['best_image_activation']:.4g} | {factor} | {r['seconds']} |"
                )
            lines.append("")
    return "\n".join(lines).encode()
