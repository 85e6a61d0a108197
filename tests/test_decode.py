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

from memscore.models.transforms import ImagePreprocess
from memscore.row_errors import ERROR_KINDS, ImageDecodeError
from memscore.stages.decode import (
    ERROR_COLUMN,
    HEIGHT_COLUMN,
    PIXELS_PREFIX,
    WIDTH_COLUMN,
    DecodeImages,
    pixels_column,
    read_image,
)
from memscore.stages.fetch import resolve_path

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
        "tags": pa.array(
            [[i, i + 1] if i % 3 else [] for i in range(n)], type=pa.list_(pa.int64())
        ),
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
            assert (
                out[WIDTH_COLUMN][row].as_py() is None and out[HEIGHT_COLUMN][row].as_py() is None
            )
            assert not got[row].any(), name  # error rows are all zeros
            assert "\n" not in errors[row] and len(errors[row]) < 400
        # the neighbouring good row is unaffected
        assert errors[row + 1] is None
        assert np.array_equal(got[row + 1], good_pixels)
        assert (out[WIDTH_COLUMN][row + 1].as_py(), out[HEIGHT_COLUMN][row + 1].as_py()) == (1, 1)


# grey16_png deliberately differs from plain convert('RGB'); tested below.
@pytest.mark.parametrize(
    "name",
    [
        "grey_png",
        "palette_png",
        "rgba_png",
        "cmyk_jpeg",
        "animated_gif",
        "one_pixel_png",
        "exif_rotated_jpeg",
    ],
)
def test_odd_images_match_reference_convert(bad, name):
    """Odd-but-valid 8-bit images decode by default exactly as Image.open().convert('RGB')."""
    assert badimages.EXPECTED_KIND[name] is None
    out = decode([str(bad[name])])
    assert out[ERROR_COLUMN][0].as_py() is None
    with Image.open(bad[name]) as im:
        assert np.array_equal(pixels(out)[0], PRE.to_array(im.convert("RGB")))


def test_exif_orientation_is_ignored_by_default_and_applied_on_request(bad):
    """Default: as stored, as the reference's Image.open().convert('RGB'); exif_transpose: upright."""
    path = bad["exif_rotated_jpeg"]
    stored_w, stored_h = badimages.EXIF_STORED_SIZE
    with Image.open(path) as im:
        upright = PRE.to_array(ImageOps.exif_transpose(im).convert("RGB"))
        as_stored = PRE.to_array(im.convert("RGB"))
    assert not np.array_equal(upright, as_stored)
    out = decode([str(path)])
    assert out[ERROR_COLUMN][0].as_py() is None
    assert (out[WIDTH_COLUMN][0].as_py(), out[HEIGHT_COLUMN][0].as_py()) == (stored_w, stored_h)
    assert np.array_equal(pixels(out)[0], as_stored)
    out = decode([str(path)], exif_transpose=True)
    assert out[ERROR_COLUMN][0].as_py() is None
    assert (out[WIDTH_COLUMN][0].as_py(), out[HEIGHT_COLUMN][0].as_py()) == (stored_h, stored_w)
    assert np.array_equal(pixels(out)[0], upright)
    assert read_image(path.read_bytes()).size == (stored_w, stored_h)
    assert read_image(path.read_bytes(), exif_transpose=True).size == (stored_h, stored_w)


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
    assert (
        kind_of(errors[2]) == "missing file" and str(tmp_path / "imgs" / "missing.png") in errors[2]
    )
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
            [
                "imgs/one.png",
                "memory://memscore-test/imgs/one.png",
                "imgs/missing.png",
                "imgs/empty.png",
                "imgs/text.jpg",
            ],
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
    assert (
        pixels_column("resmem") in out.column_names and pixels_column("small") in out.column_names
    )
    with Image.open(good) as im:
        rgb = im.convert("RGB")
    big_px, small_px = pixels(out, "resmem"), pixels(out, "small")
    assert big_px.shape == (2, 227, 227, 3) and small_px.shape == (2, 112, 112, 3)
    assert np.array_equal(big_px[0], PRE.to_array(rgb))
    assert np.array_equal(small_px[0], small.to_array(rgb))
    assert not big_px[1].any() and not small_px[1].any()


def test_chunked_input_and_large_string_paths(tmp_path):
    good = str(badimages.write_one_pixel_png(tmp_path))
    column = pa.chunked_array(
        [pa.array([good, None], pa.large_string()), pa.array([good], pa.large_string())]
    )
    table = pa.table({"path": column})
    out = DecodeImages("path", {"resmem": PRE})(table)
    assert out.select(["path"]).equals(table)
    assert [kind_of(e) for e in out.column(ERROR_COLUMN).to_pylist()] == [
        None,
        "missing path",
        None,
    ]


def test_stage_pickles_after_use(tmp_path):
    good = str(badimages.write_one_pixel_png(tmp_path))
    stage = DecodeImages("path", {"resmem": PRE}, storage_options={"anon": True})
    stage(pa.table({"path": [f"file://{good}"]}))
    clone = pickle.loads(pickle.dumps(stage))
    assert clone.fetcher._filesystems == {}
    out = clone(pa.table({"path": [good]}))
    assert out[ERROR_COLUMN][0].as_py() is None


def test_missing_path_column_and_clashing_columns_are_config_errors():
    stage = DecodeImages("path", {"resmem": PRE})
    with pytest.raises(KeyError):
        stage(pa.table({"other": ["x"]}))
    with pytest.raises(ValueError, match="already has"):
        stage(pa.table({"path": ["x"], "memscore_error": ["y"]}))


# ------------------------------------------------------------------- hostile and odd files
@pytest.mark.parametrize("name", ["ztxt_bomb_png", "itxt_bomb_png", "many_text_chunks_png"])
def test_png_text_chunk_bombs_are_refused_with_little_memory(bad, name):
    import tracemalloc

    data = bad[name].read_bytes()
    assert len(data) < 100_000  # a tiny file...
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError) as info:
            read_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.kind == badimages.EXPECTED_KIND[name] == "decompression bomb"
    assert "PNG text chunk" in info.value.detail and "MAX_TEXT_" in info.value.detail, (
        info.value.detail
    )
    # ...whose text Pillow stops inflating at MAX_TEXT_CHUNK (1 MiB) per chunk, MAX_TEXT_MEMORY
    # (64 MiB) in all, instead of the 16 MiB per chunk the bombs hold.
    from PIL import PngImagePlugin

    limit = (
        PngImagePlugin.MAX_TEXT_MEMORY
        if name == "many_text_chunks_png"
        else PngImagePlugin.MAX_TEXT_CHUNK
    )
    assert peak < limit + 8 * 2**20, peak


def test_looping_gif_gives_first_frame_quickly(bad):
    import time

    path = bad["looping_gif"]
    with Image.open(path) as im:
        assert im.n_frames == badimages.LOOPING_GIF_FRAMES and im.info["loop"] == 0
    start = time.perf_counter()
    out = decode([str(path)])
    elapsed = time.perf_counter() - start
    assert out[ERROR_COLUMN][0].as_py() is None
    assert elapsed < 2.0, elapsed  # one frame decoded, not 1000 (~10 ms here)
    assert (pixels(out)[0] == badimages.LOOPING_GIF_FIRST_COLOUR).all()


def test_jpeg_with_corrupt_markers_in_the_scan(bad):
    # an EOI (FF D9) mid-scan: libjpeg stops there and fills the rest with grey; Pillow accepts it
    image = read_image(bad["jpeg_eoi_midstream"].read_bytes())
    clean = np.asarray(Image.open(io.BytesIO(badimages.clean_jpeg_bytes())).convert("RGB"))
    got = np.asarray(image)
    assert image.size == (320, 240)
    assert np.array_equal(got[:96], clean[:96])  # the rows before the damage are intact
    assert (got[-16:] == 128).all()  # the rows after it are grey
    # garbage markers mid-scan: Pillow reports a broken data stream
    with pytest.raises(ImageDecodeError) as info:
        read_image(bad["jpeg_bad_marker"].read_bytes())
    assert info.value.kind == badimages.EXPECTED_KIND["jpeg_bad_marker"] == "decode failed"
    assert "broken data stream" in info.value.detail


def test_junk_after_the_image_is_ignored(bad):
    out = decode([str(bad["png_with_junk"]), str(bad["jpeg_with_junk"])])
    assert out.column(ERROR_COLUMN).to_pylist() == [None, None]
    png = np.asarray(read_image(bad["png_with_junk"].read_bytes()))
    assert np.array_equal(png, np.asarray(badimages._photo()))  # lossless: the very pixels written
    jpeg = np.asarray(read_image(bad["jpeg_with_junk"].read_bytes()))
    assert np.array_equal(jpeg, np.asarray(read_image(badimages.clean_jpeg_bytes())))
    with Image.open(io.BytesIO(badimages.clean_jpeg_bytes())) as im:
        assert np.array_equal(pixels(out)[1], PRE.to_array(im.convert("RGB")))


def test_path_with_spaces_and_unicode(bad):
    path = bad["unicode_name"]
    folder = path.parent.parent
    assert path.relative_to(folder).as_posix() == badimages.UNICODE_NAME
    out = decode([str(path), badimages.UNICODE_NAME, f"file://{path}"], base_dir=str(folder))
    assert out.column(ERROR_COLUMN).to_pylist() == [None, None, None]
    assert out[WIDTH_COLUMN].to_pylist() == [96] * 3 and out[HEIGHT_COLUMN].to_pylist() == [64] * 3
    expected = PRE.to_array(badimages._photo())
    assert all(np.array_equal(p, expected) for p in pixels(out))


def test_confine_to_refuses_paths_outside_the_folder(tmp_path):
    folder = tmp_path / "input"
    links = badimages.write_symlinks(folder)
    good = badimages.write_one_pixel_png(folder)
    names = list(links)
    paths = [str(links[n]) for n in names] + [
        str(good),
        str(folder / "missing.png"),
        "link_inside.png",
    ]
    expected = [badimages.SYMLINK_EXPECTED_KIND[n] for n in names] + [None, "missing file", None]
    assert "outside input folder" in ERROR_KINDS

    # the folder given as itself, as a file:// URL, and through a symlink to it
    alias = tmp_path / "alias"
    alias.symlink_to(folder, target_is_directory=True)
    for confine_to in (str(folder), f"file://{folder}", str(alias) + "/"):
        out = decode(paths, base_dir=str(folder), confine_to=confine_to, io_threads=3)
        errors = out.column(ERROR_COLUMN).to_pylist()
        assert [kind_of(e) for e in errors] == expected, (confine_to, errors)
        for error in errors:
            if kind_of(error) == "outside input folder":
                assert "secret.png" in error and "outside" in error and "\n" not in error
        assert not pixels(out)[[i for i, k in enumerate(expected) if k]].any()

    # without confine_to the links are followed
    out = decode(paths, base_dir=str(folder))
    assert [kind_of(e) for e in out.column(ERROR_COLUMN).to_pylist()] == [None] * len(names) + [
        None,
        "missing file",
        None,
    ]
    # confine_to only checks local paths
    with pytest.raises(ValueError, match="local folder"):
        DecodeImages("path", {"resmem": PRE}, confine_to="s3://bucket/images")


# ------------------------------------------------------------------------- JPEG draft mode
def _jpeg_file(path: Path, size, exif=None) -> Path:
    image = badimages._photo(*size)
    kwargs = {"exif": exif.tobytes()} if exif is not None else {}
    image.save(path, format="JPEG", quality=90, **kwargs)
    return path


def test_draft_only_for_large_jpegs_with_fast_decode_and_sizes_stay_full(tmp_path):
    below = _jpeg_file(tmp_path / "below.jpg", (1023, 1400))  # one side < 4 * 256
    exif = Image.Exif()
    exif[0x0112] = 6
    above = _jpeg_file(tmp_path / "above.jpg", (1600, 1100), exif)  # both >= 1024, rotated
    square = _jpeg_file(tmp_path / "square.jpg", (1024, 1024))
    paths = [str(below), str(above), str(square)]
    plain = decode(paths)  # the default: every pixel, as stored
    for out in (
        decode(paths, fast_decode=True, exif_transpose=True),
        decode(paths, exif_transpose=True),
    ):
        assert out.column(ERROR_COLUMN).to_pylist() == [None] * 3
        assert out[WIDTH_COLUMN].to_pylist() == [1023, 1100, 1024]  # full size, EXIF-rotated
        assert out[HEIGHT_COLUMN].to_pylist() == [1400, 1600, 1024]
    drafted = decode(paths, fast_decode=True)
    for out in (drafted, plain):  # without exif_transpose: the stored orientation
        assert out.column(ERROR_COLUMN).to_pylist() == [None] * 3
        assert out[WIDTH_COLUMN].to_pylist() == [1023, 1600, 1024]
        assert out[HEIGHT_COLUMN].to_pylist() == [1400, 1100, 1024]
    got, ref = pixels(drafted), pixels(plain)
    for i, path in enumerate(paths):  # the default is the reference, pixel for pixel
        with Image.open(path) as im:
            assert np.array_equal(ref[i], PRE.to_array(im.convert("RGB"))), path
    assert np.array_equal(ref[0], got[0])  # below the threshold: untouched by fast_decode
    for i in (1, 2):  # drafted: different, but close
        assert not np.array_equal(got[i], ref[i])
        assert np.abs(got[i].astype(int) - ref[i].astype(int)).mean() < 2.0
    # the draft keeps at least twice the target: 1600x1100 -> 1/2 (800x550), not 1/4 (400x275)
    image = read_image(above.read_bytes(), draft_to=256, exif_transpose=True)
    assert image.size == (550, 800)
    assert read_image(above.read_bytes()).size == (1600, 1100)  # read_image: no draft by default
    # a smaller resize target lowers the threshold: (128, 128) -> 512 on both sides
    small = ImagePreprocess(resize=(128, 128), crop=112)
    out = decode([str(below)], preprocess={"small": small}, fast_decode=True)
    with Image.open(below) as im:
        assert not np.array_equal(pixels(out, "small")[0], small.to_array(im.convert("RGB")))
    # ... but the largest resize over all entries counts
    out = decode([str(below)], preprocess={"small": small, "resmem": PRE}, fast_decode=True)
    with Image.open(below) as im:
        assert np.array_equal(pixels(out, "small")[0], small.to_array(im.convert("RGB")))


_DRAFT_PROBE = r"""
import json, sys, time
import numpy as np, pyarrow as pa
from memscore.stages.decode import DecodeImages
from memscore.models.transforms import ImagePreprocess

huge, small, out_dir = sys.argv[1:4]
def status(field):  # this process's own memory, in bytes (VmHWM: peak resident set)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
def reset_peak():  # Linux >= 4.0: VmHWM := VmRSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")
def run(path, **kw):
    stage = DecodeImages("path", {"resmem": ImagePreprocess()}, io_threads=1, **kw)
    wall, cpu = time.perf_counter(), time.process_time()
    table = stage(pa.table({"path": [path]}))
    return table, (time.perf_counter() - wall, time.process_time() - cpu)
run(small)  # imports torchvision, warms up
result = {}
for name, kw in (("draft", {"fast_decode": True}), ("full", {})):
    base = reset_peak()
    table, first = run(huge, **kw)
    result["mem_" + name] = status("VmHWM") - base
    del table
    table, second = run(huge, **kw)
    result["t_" + name] = min(first[0], second[0])  # wall
    result["cpu_" + name] = min(first[1], second[1])  # CPU: steadier on a busy machine
    assert table["memscore_error"][0].as_py() is None, table["memscore_error"][0]
    result["size_" + name] = [table["memscore_width"][0].as_py(), table["memscore_height"][0].as_py()]
    np.save(f"{out_dir}/{name}.npy", table.column(table.column_names[-1]).combine_chunks().to_numpy()[0])
print(json.dumps(result))
"""


@pytest.fixture(scope="session")
def huge_jpeg(tmp_path_factory) -> Path:
    return badimages.write_huge_jpeg(tmp_path_factory.mktemp("huge"))


@pytest.fixture(scope="module")
def draft_probe(huge_jpeg, tmp_path_factory) -> dict:
    """Decode the 8000x8000 JPEG with and without draft mode in a fresh process (for maxrss)."""
    import json
    import subprocess
    import sys

    out_dir = tmp_path_factory.mktemp("draft")
    small = str(badimages.sample("astronaut.png"))
    proc = subprocess.run(
        [sys.executable, "-c", _DRAFT_PROBE, str(huge_jpeg), small, str(out_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["draft"] = np.load(out_dir / "draft.npy")
    result["full"] = np.load(out_dir / "full.npy")
    return result


def test_draft_mode_bounds_memory_and_time_for_huge_jpegs(draft_probe):
    r = draft_probe
    mib = 2**20
    draft_mem, full_mem = r["mem_draft"] / mib, r["mem_full"] / mib
    mad = float(np.abs(r["draft"].astype(np.int16) - r["full"].astype(np.int16)).mean())
    print(
        f"\n8000x8000 JPEG: draft {r['t_draft']:.3f} s wall {r['cpu_draft']:.3f} s CPU, "
        f"+{draft_mem:.0f} MiB peak; full {r['t_full']:.3f} s wall {r['cpu_full']:.3f} s CPU, "
        f"+{full_mem:.0f} MiB peak; mean abs diff {mad:.3f}"
    )
    assert r["size_draft"] == r["size_full"] == list(badimages.HUGE_JPEG_SIZE)  # full size reported
    assert full_mem > 150  # 64 Mpixels decoded as RGB: 183 MiB at least
    assert draft_mem < 40 and draft_mem < full_mem / 5  # 1000x1000 decoded
    assert r["cpu_draft"] < r["cpu_full"] / 3
    assert 0 < mad < 2.0


@pytest.mark.slow
def test_draft_mode_barely_moves_the_score(draft_probe):
    import torch

    from memscore.models import get_model, get_model_weights

    weights = get_model_weights("resmem").DEFAULT
    model = get_model("resmem")
    with torch.inference_mode():
        scores = model(
            weights.transforms.to_tensor(np.stack([draft_probe["draft"], draft_probe["full"]]))
        )
    draft_score, full_score = (float(s) for s in scores.flatten())
    print(
        f"\nResMem on the 8000x8000 JPEG: draft {draft_score:.5f}, full {full_score:.5f}, "
        f"diff {draft_score - full_score:+.5f}"
    )
    assert abs(draft_score - full_score) < 0.01


# -------------------------------------------------------------------------- pixel budget
def test_pixel_budget_bounds_pixels_in_flight(monkeypatch):
    import memscore.stages.decode as decode_module

    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "alone": 0}
    real_load = decode_module._load_rgb

    def counting_load(image, *args):
        n = image.size[0] * image.size[1]
        with lock:
            state["now"] += n
            if state["now"] > budget:
                assert state["now"] == n, (
                    "only an image larger than the budget may exceed it, alone"
                )
                state["alone"] += 1
            state["peak"] = max(state["peak"], state["now"])
        try:
            return real_load(image, *args)
        finally:
            with lock:
                state["now"] -= n

    monkeypatch.setattr(decode_module, "_load_rgb", counting_load)
    paths = [str(badimages.sample(name)) for name in READABLE] * 3
    budget = 600_000  # about two 512x512 images
    reference = decode(paths, io_threads=1)
    threaded = decode(paths, io_threads=8, max_inflight_pixels=budget)
    assert reference.column(ERROR_COLUMN).null_count == len(paths)
    assert threaded.equals(reference)
    assert 0 < state["peak"] and state["alone"] > 0  # hubble (1000x872) runs alone

    # a budget smaller than every image: one at a time, same results, no deadlock
    state.update(peak=0, alone=0)
    budget = 1
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            out=decode(paths + [None, "/nope.png"], io_threads=8, max_inflight_pixels=1)
        ),
        daemon=True,
    )
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "decode with a tiny pixel budget deadlocked"
    out = result["out"]
    assert out.slice(0, len(paths)).equals(reference)
    assert [kind_of(e) for e in out.column(ERROR_COLUMN).to_pylist()[-2:]] == [
        "missing path",
        "missing file",
    ]
    assert state["peak"] == max(
        w * h
        for w, h in zip(reference[WIDTH_COLUMN].to_pylist(), reference[HEIGHT_COLUMN].to_pylist())
    )


def test_pixel_budget_fifo_and_release():
    from memscore.stages.decode import _PixelBudget

    budget = _PixelBudget(10)
    assert budget.acquire(25) == 10  # larger than the whole budget: takes all of it
    got = []
    waiter = threading.Thread(target=lambda: got.append(budget.acquire(3)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # waits while the big one runs
    budget.release(10)
    waiter.join(5)
    assert got == [3] and budget.free == 7
    budget.release(3)
    assert budget.free == 10
    # many threads, random sizes: never more than the budget out, everything returned
    import random

    rng = random.Random(0)
    sizes = [rng.randint(1, 15) for _ in range(400)]
    out_now, peak, lock = [0], [0], threading.Lock()

    def work(n):
        held = budget.acquire(n)
        with lock:
            out_now[0] += held
            peak[0] = max(peak[0], out_now[0])
        with lock:
            out_now[0] -= held
        budget.release(held)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, sizes))
    assert peak[0] <= 10 and budget.free == 10

    # a waiter interrupted while queued (here by a signal) gives up its turn; later ones still run
    assert budget.acquire(10) == 10
    late = []
    behind = threading.Thread(target=lambda: late.append(budget.acquire(2)))

    def on_alarm(signum, frame):
        raise Hung("interrupted")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Hung):
            behind.start()  # queues behind this thread's ticket, taken next
            budget.acquire(4)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    budget.release(10)
    behind.join(5)
    assert late == [2] and budget.free == 8


def test_new_options_are_validated_and_survive_pickling():
    with pytest.raises(ValueError, match="max_inflight_pixels"):
        DecodeImages("path", {"resmem": PRE}, max_inflight_pixels=0)
    stage = DecodeImages(
        "path",
        {"resmem": PRE},
        max_inflight_pixels=123,
        fast_decode=True,
        exif_transpose=True,
        confine_to="/data",
    )
    clone = pickle.loads(pickle.dumps(stage))
    assert (
        clone.max_inflight_pixels,
        clone.fast_decode,
        clone.exif_transpose,
        clone.confine_to,
    ) == (123, True, True, "/data")
    assert (
        DecodeImages("path", {"resmem": PRE}).fast_decode,
        DecodeImages("path", {"resmem": PRE}).exif_transpose,
    ) == (False, False)
    assert clone._budget.total == 123 and clone._budget is not stage._budget


@pytest.mark.parametrize(
    "height,width", [(300, 400), (256, 256), (1000, 37), (227, 227), (2000, 3000), (255, 257)]
)
def test_the_pillow_half_of_preprocessing_equals_torchvision_pixel_for_pixel(height, width):
    from torchvision.transforms import functional as F

    from memscore.models.transforms import ImagePreprocess, TenCropPreprocess

    image = Image.fromarray(
        np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    )
    resized = F.resize(image, [256, 256])
    assert np.array_equal(
        ImagePreprocess().to_array(image), np.asarray(F.center_crop(resized, [227, 227]))
    )
    assert np.array_equal(TenCropPreprocess().to_array(image), np.asarray(resized))


def test_decoding_never_imports_torch():
    # A decode worker that imported torch (through torchvision) spent seconds of CPU and ~0.5 GB
    # at start, on the cores the model actor was loading on.
    import subprocess
    import sys

    image = Path(__file__).resolve().parent.parent / "examples" / "images" / "camera.png"
    code = (
        "import sys, pyarrow as pa\n"
        "from memscore.stages.decode import DecodeImages\n"
        "from memscore.models.transforms import ImagePreprocess, TenCropPreprocess\n"
        "pre = {'a': ImagePreprocess(resize=(256, 256), crop=227), 'b': TenCropPreprocess()}\n"
        f"out = DecodeImages('path', pre)(pa.table({{'path': [{str(image)!r}]}}))\n"
        "assert out.column('memscore_error').null_count == 1, out.column('memscore_error')\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
