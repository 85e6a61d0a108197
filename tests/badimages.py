"""Real hostile and odd image files, written with Pillow into a folder (no mocks).

``write_all(folder)`` writes every case and returns ``{name: path}``; ``EXPECTED_KIND[name]`` is the
error kind the decode stage must report for it (None: it must decode fine). Each writer is also
usable on its own: ``write_<name>(folder) -> Path``.

Used by the decode-stage tests and by end-to-end tests.
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

_ROOT = Path(__file__).resolve().parent.parent
#: Real sample photos (scikit-image's sample data, see the READMEs beside them).
SAMPLE_DIRS = (_ROOT / "examples" / "images", _ROOT / "tests" / "data" / "images")


def sample(name: str) -> Path:
    """Path of a sample image by file name, from examples/images or tests/data/images."""
    for folder in SAMPLE_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no sample image {name} in {', '.join(map(str, SAMPLE_DIRS))}")

#: (width, height) of the stored pixels of the EXIF-rotated JPEG; decoded size is (height, width).
EXIF_STORED_SIZE = (64, 40)
#: Size declared by the decompression-bomb PNG.
BOMB_SIZE = (20_000, 20_000)
#: Colours of the animated GIF's frames; the decode must give the first.
GIF_FRAME_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))


def _photo(width: int = 96, height: int = 64) -> Image.Image:
    """A small RGB image with structure (gradients), so resizes and rotations are visible."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack(
        [(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x + y) * 7) % 256], axis=-1
    ).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


# -------------------------------------------------------------------------- must fail
def write_empty(folder: Path) -> Path:
    path = folder / "empty.jpg"
    path.write_bytes(b"")
    return path


def write_text_as_jpg(folder: Path) -> Path:
    path = folder / "text.jpg"
    path.write_text("this is not a JPEG, just text pretending to be one\n" * 20)
    return path


def write_truncated_jpeg(folder: Path) -> Path:
    """A valid JPEG cut to 60% of its bytes."""
    data = _jpeg_bytes(_photo(320, 240))
    path = folder / "truncated.jpg"
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def write_bomb_png(folder: Path, size: tuple[int, int] = BOMB_SIZE) -> Path:
    """A tiny PNG whose IHDR declares ``size`` (default 20000x20000 = 400 Mpixels).

    Written as a real 1x1 greyscale PNG, then the IHDR width/height are patched and the chunk's CRC
    recomputed with zlib.crc32, so the file is a few dozen bytes yet valid up to its IDAT.
    """
    buf = io.BytesIO()
    Image.new("L", (1, 1), 0).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    ihdr = bytearray(data[16:29])  # 13 bytes of IHDR data
    ihdr[0:8] = struct.pack(">II", *size)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    path = folder / "bomb.png"
    path.write_bytes(bytes(data))
    return path


def copy_unreadable_tiff(folder: Path) -> Path:
    """multipage_rgb.tif from the sample images: a real file Pillow cannot open."""
    path = folder / "multipage_rgb.tif"
    shutil.copyfile(sample("multipage_rgb.tif"), path)
    return path


# -------------------------------------------------------------------------- must decode
def write_grey_png(folder: Path) -> Path:
    path = folder / "grey_L.png"
    _photo().convert("L").save(path)
    return path


def write_palette_png(folder: Path) -> Path:
    path = folder / "palette_P.png"
    _photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path)
    return path


def write_rgba_png(folder: Path) -> Path:
    image = _photo().convert("RGBA")
    alpha = np.zeros((image.height, image.width), np.uint8)
    alpha[:, image.width // 2 :] = 255  # half transparent
    image.putalpha(Image.fromarray(alpha, mode="L"))
    path = folder / "rgba.png"
    image.save(path)
    return path


def write_cmyk_jpeg(folder: Path) -> Path:
    path = folder / "cmyk.jpg"
    path.write_bytes(_jpeg_bytes(_photo().convert("CMYK")))
    with Image.open(path) as check:
        assert check.mode == "CMYK", check.mode
    return path


def write_16bit_png(folder: Path) -> Path:
    """Greyscale 16-bit PNG (mode I;16) whose values span 0..65535 (a horizontal ramp)."""
    width, height = 128, 32
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    arr = np.tile(ramp, (height, 1))
    image = Image.fromarray(arr)
    path = folder / "grey16.png"
    image.save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I"), check.mode
        back = np.asarray(check)
        assert int(back.min()) == 0 and int(back.max()) == 65535, (back.min(), back.max())
    return path


def write_exif_rotated_jpeg(folder: Path) -> Path:
    """Non-square JPEG stored as EXIF_STORED_SIZE with orientation 6 (rotate 90 CW to display)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = folder / "exif_rot6.jpg"
    path.write_bytes(_jpeg_bytes(_photo(*EXIF_STORED_SIZE), exif=exif.tobytes()))
    with Image.open(path) as check:
        assert check.size == EXIF_STORED_SIZE and check.getexif().get(0x0112) == 6
    return path


def write_animated_gif(folder: Path) -> Path:
    """3 frames of different solid colours (GIF_FRAME_COLOURS); the first frame is red."""
    frames = [Image.new("RGB", (24, 16), colour) for colour in GIF_FRAME_COLOURS]
    path = folder / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3, check.n_frames
    return path


def write_one_pixel_png(folder: Path) -> Path:
    path = folder / "one_pixel.png"
    Image.new("RGB", (1, 1), (10, 200, 30)).save(path)
    return path


WRITERS = {
    "empty": write_empty,
    "text_as_jpg": write_text_as_jpg,
    "truncated_jpeg": write_truncated_jpeg,
    "bomb_png": write_bomb_png,
    "unreadable_tiff": copy_unreadable_tiff,
    "grey_png": write_grey_png,
    "palette_png": write_palette_png,
    "rgba_png": write_rgba_png,
    "cmyk_jpeg": write_cmyk_jpeg,
    "grey16_png": write_16bit_png,
    "exif_rotated_jpeg": write_exif_rotated_jpeg,
    "animated_gif": write_animated_gif,
    "one_pixel_png": write_one_pixel_png,
}

#: name -> error kind the decode stage must report (None: decodes fine).
EXPECTED_KIND: dict[str, str | None] = {
    "empty": "empty file",
    "text_as_jpg": "not an image",
    "truncated_jpeg": "truncated",
    "bomb_png": "decompression bomb",
    "unreadable_tiff": "not an image",
    "grey_png": None,
    "palette_png": None,
    "rgba_png": None,
    "cmyk_jpeg": None,
    "grey16_png": None,
    "exif_rotated_jpeg": None,
    "animated_gif": None,
    "one_pixel_png": None,
}


def write_all(folder: Path) -> dict[str, Path]:
    """Write every case into ``folder`` (created if needed); returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {name: writer(folder) for name, writer in WRITERS.items()}
