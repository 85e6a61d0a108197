"""``memscore maps SCORES --render DIR``: a ``memscore score --maps`` output drawn.

Reads the output folder file by file (local or s3://), keeping only the rows it draws: the
first ``--limit`` rows (by ``memscore_row``) for overlays, and the ``--sheet`` most and least
memorable for the sheet, so its memory is bounded whatever the row count. Their photos are
read again (``sources.readback``: by path, or by the source's own tasks for shards and images
inside Parquet) and decoded as the run decoded them (its EXIF setting). Writes, under
``--render``, ``overlays/<row>-<name>.png`` (``overlay``), ``sheet.png`` and ``maps.json``.
"""

from __future__ import annotations

import heapq
import io
import json
import re
from typing import Any

import numpy as np
import pyarrow.compute as pc

from memscore import storage
from memscore.columns import ERROR, ROW
from memscore.errors import MemscoreError
from memscore.maps.config import MapsConfig
from memscore.maps.overlay import crop_box, overlay
from memscore.sinks import open_sink
from memscore.sinks.folder import read_summary
from memscore.sources.readback import image_bytes, images_in_place

__all__ = ["maps", "OWN_ENTRIES"]

OVERLAYS = "overlays"
SHEET = "sheet.png"
SUMMARY = "maps.json"
#: What ``memscore maps`` writes under --render.
OWN_ENTRIES = (OVERLAYS, SHEET, SUMMARY)
TILE = 192
LABEL = 20


def maps(config: MapsConfig) -> dict[str, Any]:
    """Draw ``config.scores``' maps; -> the summary written to ``maps.json``.

    Example (a run with ``--maps`` first):
        >>> import memscore
        >>> from memscore.maps.config import MapsConfig
        >>> from memscore.maps.job import maps
        >>> _ = memscore.score(memscore.ScoreConfig("examples/images", output="scores/",
        ...                                         maps=True))
        >>> drawn = maps(MapsConfig("scores/", render="overlays/"))
        >>> len(drawn["overlays"]), drawn["column"]
        (5, 'memorability_map')
    """
    config = config.validated()
    options = dict(config.storage_options)
    try:
        summary = read_summary(config.scores, options)
    except FileNotFoundError:
        raise MemscoreError(
            f"{config.scores}: no finished memscore score run there (no _memscore.json)"
        ) from None
    sink = open_sink(config.scores, options)
    files = sink.files()
    if not files:
        raise MemscoreError(f"{config.scores}: the run wrote no rows")
    column = _map_column(config, sink.columns_of(files[0]))
    score = column[: -len("_map")]
    run = summary.get("config", {})
    path_column = run.get("path_column", "path")
    names = sink.columns_of(files[0])
    key_column = next((c for c in (path_column, "__key__") if c in names), None)
    _check_render_folder(config)

    first: list[tuple[int, int, float, Any, np.ndarray]] = []  # heap of (-row, ...) for --limit
    best: list[tuple[float, int, Any, np.ndarray]] = []
    worst: list[tuple[float, int, Any, np.ndarray]] = []
    rows_with_maps = 0
    wanted = [ROW, ERROR, score, column] + ([key_column] if key_column else [])
    for path in files:
        table = sink.read_file(path, wanted)
        table = table.filter(pc.is_valid(table.column(column)))
        rows_with_maps += table.num_rows
        ids = table.column(ROW).to_pylist()
        scores = table.column(score).to_pylist()
        keys = table.column(key_column).to_pylist() if key_column else [None] * len(ids)
        values = table.column(column).to_pylist()
        for row, value, key, cells in zip(ids, scores, keys, values):
            if config.limit:
                item = (-row, row, value, key, cells)
                if len(first) < config.limit:
                    heapq.heappush(first, item)
                elif row < first[0][1]:
                    heapq.heapreplace(first, item)
            if config.sheet:
                _keep(best, (value, -row, key, cells), config.sheet)
                _keep(worst, (-value, -row, key, cells), config.sheet)
    if rows_with_maps == 0:
        raise MemscoreError(
            f"{config.scores}: no row has a {column} (every row an error?); run "
            f"`memscore score ... --maps` on images that decode"
        )
    overlays = sorted(((row, value, key, cells) for _, row, value, key, cells in first))
    most = sorted(((v, -r, k, c) for v, r, k, c in best), reverse=True)
    least = sorted((-v, -r, k, c) for v, r, k, c in worst)
    shown = {row: key for row, _, key, _ in overlays}
    shown.update({row: key for _, row, key, _ in most + least})

    photos = _photos(config, summary, run, shown, key_column)
    model = _model_of(run, score)
    from memscore.models import get_model_weights

    preprocess = get_model_weights(model).DEFAULT.transforms

    def drawn(row, cells):
        photo = photos.get(row)
        if photo is None:
            return None
        size = int(round(len(cells) ** 0.5))
        grid = np.asarray(cells, np.float32).reshape(size, size)
        return overlay(photo, grid, crop_box(preprocess, *photo.size))

    written = []
    for row, value, key, cells in overlays:
        image = drawn(row, cells)
        if image is None:
            continue
        name = f"{OVERLAYS}/{row}-{_safe_name(key)}.png"
        written.append(
            {
                "row": row,
                key_column or ROW: key if key_column else row,
                score: value,
                "file": _write(config, name, _png(image)),
            }
        )
    sheet = None
    if most:
        sheet = _write(config, SHEET, _png(_sheet(most, least, drawn)))
    result = {
        "scores": config.scores,
        "render": config.render,
        "column": column,
        "score_column": score,
        "maps": summary.get("maps"),
        "rows_with_maps": rows_with_maps,
        "overlays": written,
        "photos_not_read_again": sorted(set(shown) - set(photos)),
        "sheet": sheet,
        "sheet_rows": {"most": [r for _, r, _, _ in most], "least": [r for _, r, _, _ in least]},
    }
    _write(config, SUMMARY, json.dumps(result, indent=2, default=str).encode())
    return result


def _keep(heap: list, item, size: int) -> None:
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)


def _map_column(config: MapsConfig, names: list[str]) -> str:
    found = [name for name in names if name.endswith("_map")]
    if config.column is not None:
        if config.column not in names:
            raise MemscoreError(
                f"--column {config.column}: {config.scores} has no such column "
                f"(map columns: {', '.join(found) or 'none'})"
            )
        return config.column
    if not found:
        raise MemscoreError(
            f"{config.scores} has no map column: score with `memscore score ... --maps`"
        )
    if len(found) > 1:
        raise MemscoreError(
            f"{config.scores} has {len(found)} map columns ({', '.join(found)}): choose one "
            f"with --column"
        )
    return found[0]


def _model_of(run: dict, score: str) -> str:
    """The model whose score column is ``score``, among the run's."""
    from memscore.stages.predict import output_types

    for model in run.get("models", ("resmem",)):
        if score in output_types((model,), run.get("column_prefix", "")):
            return model
    raise MemscoreError(f"no model of the run writes {score!r}")


def _check_render_folder(config: MapsConfig) -> None:
    fs, path = storage.url_to_fs(config.render, config.storage_options)
    if not fs.exists(path):
        return
    entries = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
    if entries and not config.overwrite:
        raise MemscoreError(
            f"--render {config.render} is not empty ({len(entries)} entries); give --overwrite "
            f"to write over memscore maps' own files there, or choose another folder"
        )


def _photos(config, summary, run, shown: dict, key_column) -> dict:
    """row -> the photo as the run decoded it (PIL RGB, full size), for the rows it can read."""
    from memscore.stages.decode import DEFAULT_MAX_PIXELS, read_image

    data = image_bytes(
        shown,
        in_place=images_in_place(summary.get("manifest_kind"), key_column),
        key_column=key_column,
        manifest=summary["manifest"],
        path_column=run.get("path_column", "path"),
        image_column=run.get("image_column"),
        base_dir=summary.get("manifest_base_dir"),
        storage_options=dict(config.storage_options),
    )
    photos = {}
    for row, raw in data.items():
        try:
            photos[row] = read_image(
                raw,
                max_pixels=run.get("max_pixels") or DEFAULT_MAX_PIXELS,
                exif_transpose=bool(run.get("exif_transpose")),
            )
        except Exception:  # noqa: BLE001 (changed since the run: left out, and counted)
            continue
    return photos


def _safe_name(key) -> str:
    stem = str(key).rstrip("/").rsplit("/", 1)[-1] if key is not None else "row"
    stem = stem.rsplit(".", 1)[0] or "row"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60]


def _sheet(most, least, drawn):
    """Two lines of tiles: the most memorable, then the least, each with its score."""
    from PIL import Image, ImageDraw

    columns = max(len(most), len(least))
    sheet = Image.new("RGB", (columns * TILE, 2 * (TILE + LABEL) + 2 * LABEL), "white")
    draw = ImageDraw.Draw(sheet)
    for line, (title, items) in enumerate((("most memorable", most), ("least memorable", least))):
        y = line * (TILE + 2 * LABEL)
        draw.text((4, y + 4), title, fill=(0, 0, 0))
        for i, (value, row, _key, cells) in enumerate(items):
            x = i * TILE
            image = drawn(row, cells)
            if image is not None:
                image.thumbnail((TILE, TILE))
                sheet.paste(image, (x + (TILE - image.width) // 2, y + LABEL))
            draw.text((x + 4, y + LABEL + TILE + 3), f"{value:.3f}", fill=(0, 0, 0))
    return sheet


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write(config, relative: str, data: bytes) -> str:
    """Write ``data`` to ``relative`` under --render, whole or not at all; -> its path."""
    return storage.write_under(config.render, relative, data, config.storage_options)
