"""Contact sheets as the ResMem paper's fig. 14 and 15, and the run's ``report.md``.

A sheet has one line per channel shown: its rendering (where one was made), then its top-k
dataset images, each as the model saw it (resized and centre-cropped by the model's own
preprocessing), with the channel's name and its Spearman correlation with the score. The
channels shown are the rendered ones, else the 8 most tied to memorability (either sign).

The images shown are read again, once for the whole run (``sheet_images``, by
``memscore.sources.readback``: by path, or by the source's own tasks where its rows carry
their images), decoded as the run decoded them (``decode_image_bytes``, with the run's EXIF
setting) and shown as the model saw them. An image that cannot be read again (moved since the
run) is a grey tile naming its row.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

__all__ = ["shown_channels", "sheet_images", "sheet_png", "report_text"]

TILE = 128
LABEL = 18
SHOWN_WITHOUT_RENDERINGS = 8


def shown_channels(layer: str, rho, rendered) -> list[int]:
    """The channels a layer's sheet shows: the rendered ones, else the most tied to
    memorability (either sign)."""
    shown = [r["channel"] for r in rendered if r["layer"] == layer]
    if shown:
        return shown
    strength = np.nan_to_num(np.abs(rho), nan=-1.0)
    return [int(c) for c in np.argsort(-strength, kind="stable")[:SHOWN_WITHOUT_RENDERINGS]]


def sheet_images(
    config, model: str, rows, keys, key_column, *, base_dir, in_place: bool
) -> dict[int, np.ndarray]:
    """row -> the image as the model saw it (uint8, its preprocessing's crop) for each of
    ``rows`` that can be read again; ``in_place``: the source's rows carry their images."""
    from memscore.models import get_model_weights
    from memscore.sources.readback import image_bytes
    from memscore.stages.decode import decode_image_bytes

    preprocess = {"view": get_model_weights(model).DEFAULT.transforms}
    data = image_bytes(
        {row: keys.get(row) for row in rows},
        in_place=in_place,
        key_column=key_column,
        manifest=config.manifest,
        path_column=config.path_column,
        image_column=config.image_column,
        base_dir=base_dir,
        storage_options=config.storage_options,
    )
    views = {}
    for row, raw in data.items():
        try:
            _, _, arrays = decode_image_bytes(
                raw, preprocess, max_pixels=config.max_pixels, exif_transpose=config.exif_transpose
            )
            views[row] = arrays["view"]
        except Exception:  # noqa: BLE001 (a sheet shows what it can; the tables hold the facts)
            continue
    return views


def _tile(view: np.ndarray | None):
    from PIL import Image

    if view is None:
        return Image.new("RGB", (TILE, TILE), (128, 128, 128))
    return Image.fromarray(view).resize((TILE, TILE))


def sheet_png(layer, top, rho, rendered, keys, views) -> bytes:
    """One layer's sheet as PNG bytes: ``top`` is its ``TopK``, ``rho`` its channels' Spearman
    with the score, ``rendered`` the run's renderings (with their PNG bytes), ``views`` the
    shown rows' images (``sheet_images``)."""
    from PIL import Image, ImageDraw

    renders = {r["channel"]: r["png"] for r in rendered if r["layer"] == layer}
    shown = shown_channels(layer, rho, rendered)
    k = top.values.shape[1]
    columns = k + (1 if renders else 0)
    sheet = Image.new("RGB", (columns * TILE, len(shown) * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for line, channel in enumerate(shown):
        y = line * (TILE + LABEL)
        draw.text((4, y + 3), f"{layer}:{channel}  spearman {rho[channel]:+.3f}", fill=(0, 0, 0))
        x = 0
        if renders:
            png = renders.get(channel)
            if png:
                tile = Image.open(io.BytesIO(png)).convert("RGB")
                sheet.paste(tile.resize((TILE, TILE)), (x, y + LABEL))
            x += TILE
        for rank in range(k):
            row = int(top.rows[channel, rank])
            view = views.get(row)
            sheet.paste(_tile(view), (x, y + LABEL))
            if view is None:
                key = keys.get(row)
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
