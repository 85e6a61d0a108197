"""The CPU decode stage on its own: a plain callable over pyarrow tables, no Ray cluster needed."""

from __future__ import annotations

import io
import os
import pickle
import signal
import socket
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from memscore.decode import (
    ERROR_COLUMN,
    ERROR_KINDS,
    HEIGHT_COLUMN,
    PIXELS_PREFIX,
    WIDTH_COLUMN,
    DecodeImages,
    ImageDecodeError,
    pixels_column,
    read_image,
    resolve_path,
)
from memscore.transforms import ImagePreprocess

try:
    import badimages
except ImportError:  # tests/ became a package
    from tests import badimages

READABLE = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "camera.png",
    "coins.png",
    "logo.png",
    "no_time_for_that_tiny.gif",
]
PRE = ImagePreprocess()
PIX = pixels_column("resmem")


def decode(paths, *, extra=None, preprocess=None, **kwargs) -> pa.Table:
    columns = {"path": pa.array(paths, type=pa.string())}
    columns.update(extra or {})
    stage = DecodeImages("path", preprocess or {"resmem": PRE}, **kwargs)
    return stage(pa.table(columns))


def pixels(table: pa.Table, name: str = "resmem") -> np.ndarray:
    return table.column(pixels_column(name)).combine_chunks().to_numpy()


def kind_of(error: str | None) -> str | None:
    if error is None:
        return None
    kind = error.split(": ", 1)[0]
    assert kind in ERROR_KINDS, error
    return kind


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return badimages.write_all(tmp_path_factory.mktemp("bad"))


class Hung(BaseException):
    """Not an Exception, so the stage's per-row ``except Exception`` cannot swallow it."""


@pytest.fixture
def alarm():
    """Fail (instead of hanging forever) if the test takes more than 10 s."""

    def on_alarm(signum, frame):
        raise Hung("decode stage hung")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------- parity
def test_parity_with_reference_pipeline():
    paths = [str(badimages.sample(name)) for name in READABLE]
    out = decode(paths)
    assert out.num_rows == len(paths)
    assert out.column(ERROR_COLUMN).null_count == len(paths), out.column(ERROR_COLUMN).to_pylist()
    got = pixels(out)
    assert got.shape == (len(paths), *PRE.array_shape) and got.dtype == np.uint8
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            expected = PRE.to_array(im.convert("RGB"))
            size = im.size
        assert np.array_equal(got[i], expected), path
        assert (out[WIDTH_COLUMN][i].as_py(), out[HEIGHT_COLUMN][i].as_py()) == size, path


def test_threads_do_not_change_results_or_order():
    paths = [str(badimages.sample(name)) for name in READABLE] * 2
    serial = decode(paths, io_threads=1)
    threaded = decode(paths, io_threads=8)
    assert serial.equals(threaded)


def test_output_schema():
    out = decode([None])
    assert out.column_names == ["path", WIDTH_COLUMN, HEIGHT_COLUMN, ERROR_COLUMN, PIX]
    assert out.schema.field(WIDTH_COLUMN).type == pa.int32()
    assert out.schema.field(HEIGHT_COLUMN).type == pa.int32()
    assert out.schema.field(ERROR_COLUMN).type == pa.string()
    assert PIX.startswith(PIXELS_PREFIX)
    assert pixels(out).shape == (1, *PRE.array_shape)


# ----------------------------------------------------------------------------- bad inputs
def test_bad_images_in_one_batch_keep_rows_and_columns(bad, tmp_path):
    good = badimages.write_one_pixel_png(tmp_path)
    names = list(bad)
    # interleave a known-good image between the hostile ones
    paths: list[str] = []
    for name in names:
        paths += [str(bad[name]), str(good)]
    n = len(paths)
    extra = {
        "id": pa.array([i if i % 5 else None for i in range(n)], type=pa.int64()),
        "score_hint": pa.array([i / 3 for i in range(n)], type=pa.float64()),
        "caption": pa.array([f"caption é 猫 {i}" for i in range(n)], type=pa.string()),
        "tags": pa.array([[i, i + 1] if i % 3 else [] for i in range(n)], type=pa.list_(pa.int64())),
    }
    original = pa.table({"path": pa.array(paths, type=pa.string()), **extra})
    out = DecodeImages("path", {"resmem": PRE})(original)

    assert out.num_rows == n
    assert out.select(original.column_names).equals(original)
    errors = out.column(ERROR_COLUMN).to_pylist()
    good_pixels = PRE.to_array(Image.open(good).convert("RGB"))
    got = pixels(out)
    for i, name in enumerate(names):
        row = 2 * i
        assert kind_of(errors[row]) == badimages.EXPECTED_KIND[name], (name, errors[row])
        if badimages.EXPECTED_KIND[name] is None:
            assert out[WIDTH_COLUMN][row].as_py() > 0 and out[HEIGHT_COLUMN][row].as_py() > 0
        else:
            assert out[WIDTH_COLUMN][row].as_py() is None and out[HEIGHT_COLUMN][row].as_py() is None
            assert not got[row].any(), name  # error rows are all zeros
            assert "\n" not in errors[row] and len(errors[row]) < 400
        # the neighbouring good row is unaffected
        assert errors[row + 1] is None
        assert np.array_equal(got[row + 1], good_pixels)
        assert (out[WIDTH_COLUMN][row + 1].as_py(), out[HEIGHT_COLUMN][row + 1].as_py()) == (1, 1)


# grey16_png and exif_rotated_jpeg deliberately differ from plain convert('RGB'); tested below.
@pytest.mark.parametrize("name", ["grey_png", "palette_png", "rgba_png", "cmyk_jpeg", "animated_gif", "one_pixel_png"])
def test_odd_images_match_reference_convert(bad, name):
    """Odd-but-valid 8-bit images without an EXIF tag decode exactly as Image.open().convert('RGB')."""
    assert badimages.EXPECTED_KIND[name] is None
    out = decode([str(bad[name])])
    assert out[ERROR_COLUMN][0].as_py() is None
    with Image.open(bad[name]) as im:
        assert np.array_equal(pixels(out)[0], PRE.to_array(im.convert("RGB")))


def test_exif_orientation_is_applied(bad):
    path = bad["exif_rotated_jpeg"]
    out = decode([str(path)])
    assert out[ERROR_COLUMN][0].as_py() is None
    stored_w, stored_h = badimages.EXIF_STORED_SIZE
    assert (out[WIDTH_COLUMN][0].as_py(), out[HEIGHT_COLUMN][0].as_py()) == (stored_h, stored_w)
    with Image.open(path) as im:
        expected = PRE.to_array(ImageOps.exif_transpose(im).convert("RGB"))
        unrotated = PRE.to_array(im.convert("RGB"))
    assert np.array_equal(pixels(out)[0], expected)
    assert not np.array_equal(pixels(out)[0], unrotated)


def test_16bit_png_is_scaled_not_clipped(bad):
    path = bad["grey16_png"]
    with Image.open(path) as im:
        assert im.mode == "I;16"
        clipped = np.asarray(im.convert("RGB"))
    assert clipped.mean() > 250  # what plain convert('RGB') does: almost all white
    image = read_image(path.read_bytes())
    arr = np.asarray(image)
    assert image.mode == "RGB" and image.size == (128, 32)
    assert 5 < arr.mean() < 250
    assert arr.min() == 0 and arr.max() == 255
    ramp = arr[0, :, 0].astype(int)
    assert (np.diff(ramp) >= 0).all()  # the horizontal ramp survives, monotonic
    # value >> 8 exactly
    source = np.asarray(Image.open(path)).astype(np.uint16)
    assert np.array_equal(arr[..., 0], (source >> 8).astype(np.uint8))
    out = decode([str(path)])
    assert out[ERROR_COLUMN][0].as_py() is None
    assert 5 < pixels(out)[0].mean() < 250


def test_other_wide_modes_are_scaled():
    ramp = np.linspace(0, 65535, 64).round()
    as_i = Image.fromarray(np.tile(ramp, (4, 1)).astype(np.int32), mode="I")
    as_f = Image.fromarray(np.tile(ramp / 65535, (4, 1)).astype(np.float32), mode="F")
    for image in (as_i, as_f):
        buf = io.BytesIO()
        image.save(buf, format="TIFF")
        arr = np.asarray(read_image(buf.getvalue()))
        assert arr.min() == 0 and arr.max() == 255, image.mode
        assert 100 < arr.mean() < 155, image.mode


def test_animated_gif_first_frame(bad):
    image = read_image(bad["animated_gif"].read_bytes())
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == badimages.GIF_FRAME_COLOURS[0]


def test_bomb_is_refused_before_decoding(bad):
    assert bad["bomb_png"].stat().st_size < 1_000_000
    with pytest.raises(ImageDecodeError) as info:
        read_image(bad["bomb_png"].read_bytes())
    assert info.value.kind == "decompression bomb"
    # the stage's own max_pixels, independent of Pillow's global
    astronaut = badimages.sample("astronaut.png")
    data = astronaut.read_bytes()
    with pytest.raises(ImageDecodeError, match=r"^decompression bomb: 512x512"):
        read_image(data, max_pixels=512 * 512 - 1)
    assert read_image(data, max_pixels=512 * 512).size == (512, 512)
    out = decode([str(astronaut)], max_pixels=1000)
    assert kind_of(out[ERROR_COLUMN][0].as_py()) == "decompression bomb"


def test_error_str_format():
    exc = ImageDecodeError("decode failed", "line one\nline two " + "x" * 1000)
    assert exc.kind == "decode failed"
    assert str(exc).startswith("decode failed: line one line two x")
    assert "\n" not in str(exc) and len(str(exc)) <= 320
    assert pickle.loads(pickle.dumps(exc)).kind == "decode failed"


# ------------------------------------------------------------------------- paths and files
def test_path_problems(tmp_path, alarm):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.jpg"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    try:
        cases = [
            (str(folder), "not a file", "is a directory"),
            (str(fifo), "not a file", "FIFO"),
            (str(sock_path), "not a file", "socket"),
            ("/dev/null", "not a file", "device"),
            (None, "missing path", "the path column is null"),
            ("", "missing path", "empty"),
            ("http://example.com/cat.jpg", "unsupported path", "not fetched"),
            ("https://example.com/cat.jpg", "unsupported path", "not fetched"),
            (str(tmp_path / "nope.jpg"), "missing file", "nope.jpg"),
            (str(tmp_path / "nope" / "deeper.jpg"), "missing file", "deeper.jpg"),
            (f"file://{tmp_path}/nope.jpg", "missing file", "nope.jpg"),
            (f"file://{fifo}", "not a file", "FIFO"),
        ]
        # io_threads=1: rows decode in this thread, so the alarm can interrupt a blocking open
        out = decode([c[0] for c in cases], io_threads=1)
        assert out.num_rows == len(cases)
        for (path, kind, detail), error in zip(cases, out.column(ERROR_COLUMN).to_pylist()):
            assert kind_of(error) == kind, (path, error)
            assert detail in error, (path, error)
    finally:
        sock.close()


def test_fifo_does_not_hang_even_in_a_thread(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=decode([str(fifo)])), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the stuck reader before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("decoding a FIFO hung")
    assert kind_of(result["out"][ERROR_COLUMN][0].as_py()) == "not a file"


def test_relative_paths_resolve_against_base_dir(tmp_path):
    sub = tmp_path / "imgs"
    sub.mkdir()
    good = badimages.write_one_pixel_png(sub)
    out = decode(["imgs/one_pixel.png", str(good), "imgs/missing.png"], base_dir=str(tmp_path))
    errors = out.column(ERROR_COLUMN).to_pylist()
    assert errors[:2] == [None, None]
    assert kind_of(errors[2]) == "missing file" and str(tmp_path / "imgs" / "missing.png") in errors[2]
    # the file:// form of the base works too
    out = decode(["imgs/one_pixel.png"], base_dir=f"file://{tmp_path}")
    assert out[ERROR_COLUMN][0].as_py() is None


def test_resolve_path():
    assert resolve_path("a/b.jpg", "/data") == os.path.join("/data", "a/b.jpg")
    assert resolve_path("a/b.jpg", "s3://bucket/manifests/") == "s3://bucket/manifests/a/b.jpg"
    assert resolve_path("a/b.jpg", "s3://bucket/manifests") == "s3://bucket/manifests/a/b.jpg"
    assert resolve_path("/abs/b.jpg", "s3://bucket/m") == "/abs/b.jpg"
    assert resolve_path("s3://other/b.jpg", "/data") == "s3://other/b.jpg"
    assert resolve_path("gs://other/b.jpg", "/data") == "gs://other/b.jpg"
    assert resolve_path("file:///x/b.jpg", "/data") == "file:///x/b.jpg"
    assert resolve_path("a/b.jpg", None) == "a/b.jpg"
    for url in ("http://h/x.jpg", "HTTPS://h/x.jpg"):
        with pytest.raises(ImageDecodeError) as info:
            resolve_path(url, "/data")
        assert info.value.kind == "unsupported path"
    with pytest.raises(ImageDecodeError, match="^unsupported path"):
        resolve_path("x.jpg", "https://h/base")


def test_fsspec_urls_read_through_fsspec(tmp_path):
    """Non-local URLs go through fsspec (memory:// here stands in for s3://, same code path)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    good = badimages.write_one_pixel_png(tmp_path)
    fs.pipe("/memscore-test/imgs/one.png", good.read_bytes())
    fs.pipe("/memscore-test/imgs/empty.png", b"")
    fs.pipe("/memscore-test/imgs/text.jpg", b"not an image")
    try:
        out = decode(
            ["imgs/one.png", "memory://memscore-test/imgs/one.png", "imgs/missing.png", "imgs/empty.png", "imgs/text.jpg"],
            base_dir="memory://memscore-test",
        )
        kinds = [kind_of(e) for e in out.column(ERROR_COLUMN).to_pylist()]
        assert kinds == [None, None, "missing file", "empty file", "not an image"]
        assert out[WIDTH_COLUMN].to_pylist() == [1, 1, None, None, None]
        out = decode(["memory://memscore-test/imgs/one.png"], max_bytes=10)
        assert kind_of(out[ERROR_COLUMN][0].as_py()) == "too large"
    finally:
        fs.rm("/memscore-test", recursive=True)


def test_too_large(tmp_path):
    good = badimages.write_one_pixel_png(tmp_path)
    size = good.stat().st_size
    out = decode([str(good)], max_bytes=size - 1)
    assert kind_of(out[ERROR_COLUMN][0].as_py()) == "too large"
    out = decode([str(good)], max_bytes=size)
    assert out[ERROR_COLUMN][0].as_py() is None


# ------------------------------------------------------------------------------- the stage
def test_empty_table():
    out = decode([], extra={"n": pa.array([], type=pa.int64())})
    assert out.num_rows == 0
    assert out.column_names == ["path", "n", WIDTH_COLUMN, HEIGHT_COLUMN, ERROR_COLUMN, PIX]
    assert pixels(out).shape == (0, *PRE.array_shape)


def test_two_preprocess_entries_give_two_pixel_columns(tmp_path):
    good = badimages.write_one_pixel_png(tmp_path)
    small = ImagePreprocess(resize=(128, 128), crop=112)
    out = decode([str(good), None], preprocess={"resmem": PRE, "small": small})
    assert pixels_column("resmem") in out.column_names and pixels_column("small") in out.column_names
    with Image.open(good) as im:
        rgb = im.convert("RGB")
    big_px, small_px = pixels(out, "resmem"), pixels(out, "small")
    assert big_px.shape == (2, 227, 227, 3) and small_px.shape == (2, 112, 112, 3)
    assert np.array_equal(big_px[0], PRE.to_array(rgb))
    assert np.array_equal(small_px[0], small.to_array(rgb))
    assert not big_px[1].any() and not small_px[1].any()


def test_chunked_input_and_large_string_paths(tmp_path):
    good = str(badimages.write_one_pixel_png(tmp_path))
    column = pa.chunked_array([pa.array([good, None], pa.large_string()), pa.array([good], pa.large_string())])
    table = pa.table({"path": column})
    out = DecodeImages("path", {"resmem": PRE})(table)
    assert out.select(["path"]).equals(table)
    assert [kind_of(e) for e in out.column(ERROR_COLUMN).to_pylist()] == [None, "missing path", None]


def test_stage_pickles_after_use(tmp_path):
    good = str(badimages.write_one_pixel_png(tmp_path))
    stage = DecodeImages("path", {"resmem": PRE}, storage_options={"anon": True})
    stage(pa.table({"path": [f"file://{good}"]}))
    clone = pickle.loads(pickle.dumps(stage))
    assert clone._filesystems == {}
    out = clone(pa.table({"path": [good]}))
    assert out[ERROR_COLUMN][0].as_py() is None


def test_missing_path_column_and_clashing_columns_are_config_errors():
    stage = DecodeImages("path", {"resmem": PRE})
    with pytest.raises(KeyError):
        stage(pa.table({"other": ["x"]}))
    with pytest.raises(ValueError, match="already has"):
        stage(pa.table({"path": ["x"], "error": ["y"]}))
