"""Real hostile and odd image files, written with Pillow into a folder (no mocks).

``write_all(folder)`` writes every case and returns ``{name: path}``; ``EXPECTED_KIND[name]`` is the
error kind the decode stage must report for it (None: it must decode fine). Each writer is also
usable on its own: ``write_<name>(folder) -> Path``.

Used by the decode-stage tests and by end-to-end tests.

Cases that need a stage option (``confine_to``: ``write_symlinks``) or are too big for every run
(``write_huge_jpeg``) are not in ``WRITERS``; the decode tests write them themselves.
"""

from __future__ import annotations

import functools
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
#: Frames of the endlessly looping GIF (loop=0); the decode must give the first, quickly.
LOOPING_GIF_FRAMES = 1000
LOOPING_GIF_FIRST_COLOUR = (11, 0, 0)
#: What the giant zTXt/iTXt chunks decompress to (Pillow stops at MAX_TEXT_CHUNK, 1 MiB).
TEXT_BOMB_BYTES = 16 * 2**20
#: Size of the huge JPEG (``write_huge_jpeg``), well above the draft-mode threshold.
HUGE_JPEG_SIZE = (8000, 8000)
#: Path, relative to the folder, of the image whose name has spaces and non-ASCII characters.
UNICODE_NAME = "my photos/ café ☕ 東京.png"


def _photo(width: int = 96, height: int = 64) -> Image.Image:
    """A small RGB image with structure (gradients), so resizes and rotations are visible."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack(
        [(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x + y) * 7) % 256],
        axis=-1,
    ).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC32 of type + data."""
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


@functools.lru_cache(maxsize=4)
def _zeros_deflated(size: int) -> bytes:
    """zlib stream of ``size`` zero bytes, compressed incrementally (never ``size`` bytes in memory)."""
    comp = zlib.compressobj(9)
    block = bytes(2**20)
    parts = [comp.compress(block) for _ in range(size // len(block))]
    parts.append(comp.compress(bytes(size % len(block))))
    parts.append(comp.flush())
    return b"".join(parts)


def _with_chunk_after_ihdr(png: bytes, chunk: bytes) -> bytes:
    assert png[12:16] == b"IHDR"
    return png[:33] + chunk + png[33:]  # 8 signature + 25 IHDR chunk


def jpeg_scan_middle(data: bytes) -> int:
    """Offset halfway through a baseline JPEG's entropy-coded data (after SOS, before EOI)."""
    sos = data.index(b"\xff\xda")
    return (sos + len(data)) // 2


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


# -------------------------------------------------------------------------- hostile, new
def write_ztxt_bomb_png(folder: Path) -> Path:
    """A valid PNG with a zTXt chunk (before the pixels) that inflates to TEXT_BOMB_BYTES (a ~16 KB file)."""
    text = b"Comment\0" + b"\0" + _zeros_deflated(TEXT_BOMB_BYTES)  # keyword, method 0, zlib data
    path = folder / "ztxt_bomb.png"
    path.write_bytes(_with_chunk_after_ihdr(_png_bytes(_photo()), _png_chunk(b"zTXt", text)))
    return path


def write_itxt_bomb_png(folder: Path) -> Path:
    """Like write_ztxt_bomb_png with a compressed iTXt chunk, placed after the pixels (before IEND)."""
    text = b"Description\0" + b"\1\0" + b"en\0" + b"\0" + _zeros_deflated(TEXT_BOMB_BYTES)
    png = _png_bytes(_photo())
    iend = png.rindex(b"IEND") - 4
    path = folder / "itxt_bomb.png"
    path.write_bytes(png[:iend] + _png_chunk(b"iTXt", text) + png[iend:])
    return path


def write_many_text_chunks_png(folder: Path) -> Path:
    """70 zTXt chunks each inflating to just under MAX_TEXT_CHUNK: past Pillow's MAX_TEXT_MEMORY."""
    one = _zeros_deflated(2**20 - 64)
    chunks = b"".join(_png_chunk(b"zTXt", b"k%d\0\0" % i + one) for i in range(70))
    path = folder / "many_text_chunks.png"
    path.write_bytes(_with_chunk_after_ihdr(_png_bytes(_photo()), chunks))
    return path


def write_looping_gif(folder: Path) -> Path:
    """LOOPING_GIF_FRAMES frames looping forever (loop=0); frame i is ((i + 11) % 256, 0, 0)."""
    frames = [Image.new("P", (64, 48), (i + 11) % 256) for i in range(LOOPING_GIF_FRAMES)]
    palette = [v for i in range(256) for v in (i, 0, 0)]
    for frame in frames:
        frame.putpalette(palette)
    path = folder / "looping.gif"
    frames[0].save(
        path,
        save_all=True,
        append_images=frames[1:],
        duration=20,
        loop=0,
        disposal=1,
        optimize=False,
    )
    with Image.open(path) as check:
        assert check.info.get("loop") == 0 and check.is_animated
    return path


def write_jpeg_eoi_midstream(folder: Path) -> Path:
    """A JPEG with an end-of-image marker (FF D9) written over the middle of its scan data."""
    data = bytearray(_jpeg_bytes(_photo(320, 240)))
    mid = jpeg_scan_middle(bytes(data))
    data[mid : mid + 2] = b"\xff\xd9"
    path = folder / "eoi_midstream.jpg"
    path.write_bytes(bytes(data))
    return path


def write_jpeg_bad_marker(folder: Path) -> Path:
    """A JPEG with garbage markers (FF FF FF 12 FE FF 01) written over the middle of its scan data."""
    data = bytearray(_jpeg_bytes(_photo(320, 240)))
    mid = jpeg_scan_middle(bytes(data))
    data[mid : mid + 7] = b"\xff\xff\xff\x12\xfe\xff\x01"
    path = folder / "bad_marker.jpg"
    path.write_bytes(bytes(data))
    return path


def write_png_with_junk(folder: Path) -> Path:
    """A valid PNG followed by 10 KiB of random bytes; its pixels are ``_photo()``'s."""
    junk = np.random.default_rng(1).bytes(10 * 1024)
    path = folder / "junk_after.png"
    path.write_bytes(_png_bytes(_photo()) + junk)
    return path


def write_jpeg_with_junk(folder: Path) -> Path:
    """A valid JPEG followed by 10 KiB of random bytes; compare with ``clean_jpeg_bytes()``."""
    junk = np.random.default_rng(2).bytes(10 * 1024)
    path = folder / "junk_after.jpg"
    path.write_bytes(clean_jpeg_bytes() + junk)
    return path


def clean_jpeg_bytes() -> bytes:
    """The JPEG that write_jpeg_with_junk appends junk to."""
    return _jpeg_bytes(_photo(320, 240))


def write_unicode_name(folder: Path) -> Path:
    """A plain PNG at ``UNICODE_NAME``: spaces (one leading the file name), accents, emoji, CJK."""
    path = folder / UNICODE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    _photo().save(path, format="PNG")
    return path


def write_symlinks(folder: Path) -> dict[str, Path]:
    """Symlinks for ``confine_to`` tests, ``folder`` being the input folder.

    Returns ``{"outside": link to a PNG in a sibling folder (outside), "inside": link to a PNG in
    ``folder``, "dir_outside": a linked folder that points outside, "escape": a ``..`` path out of
    ``folder``}``; the kinds expected with ``confine_to=folder`` are ``SYMLINK_EXPECTED_KIND``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    outside = folder.parent / f"{folder.name}-outside"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret.png"
    _photo().save(secret)
    target = folder / "target.png"
    _photo().save(target)
    links = {
        "outside": folder / "link_outside.png",
        "inside": folder / "link_inside.png",
        "dir_outside": folder / "linked_dir",
    }
    links["outside"].symlink_to(secret)
    links["inside"].symlink_to("target.png")  # relative, stays inside
    links["dir_outside"].symlink_to(outside, target_is_directory=True)
    return {
        **links,
        "dir_outside": links["dir_outside"] / "secret.png",
        "escape": folder / ".." / outside.name / "secret.png",
    }


SYMLINK_EXPECTED_KIND = {
    "outside": "outside input folder",
    "inside": None,
    "dir_outside": "outside input folder",
    "escape": "outside input folder",
}


def write_huge_jpeg(folder: Path, size: tuple[int, int] = HUGE_JPEG_SIZE) -> Path:
    """A ``size`` JPEG (quality 85): smooth gradients plus mild noise, a few MB. Takes ~2 s."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 8, size=(height, width), dtype=np.uint8)
    arr = np.empty((height, width, 3), np.uint8)
    arr[..., 0] = x
    arr[..., 1] = y
    arr[..., 2] = ((x + y) / 2).astype(np.uint8)  # broadcasts to (height, width)
    arr[..., 0] += noise
    arr[..., 1] += noise[::-1]
    del noise
    path = folder / "huge.jpg"
    Image.fromarray(arr, mode="RGB").save(path, format="JPEG", quality=85)
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
    "ztxt_bomb_png": write_ztxt_bomb_png,
    "itxt_bomb_png": write_itxt_bomb_png,
    "many_text_chunks_png": write_many_text_chunks_png,
    "looping_gif": write_looping_gif,
    "jpeg_eoi_midstream": write_jpeg_eoi_midstream,
    "jpeg_bad_marker": write_jpeg_bad_marker,
    "png_with_junk": write_png_with_junk,
    "jpeg_with_junk": write_jpeg_with_junk,
    "unicode_name": write_unicode_name,
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
    # Pillow refuses a zTXt/iTXt that inflates past MAX_TEXT_CHUNK (ValueError), before or after
    # the pixels; the stage reports it as a bomb (the detail names the PNG text chunk).
    "ztxt_bomb_png": "decompression bomb",
    "itxt_bomb_png": "decompression bomb",
    "many_text_chunks_png": "decompression bomb",  # MAX_TEXT_MEMORY (64 MiB of text in total)
    "looping_gif": None,  # the first frame
    "jpeg_eoi_midstream": None,  # libjpeg stops at the EOI and greys the rest: Pillow accepts it
    "jpeg_bad_marker": "decode failed",  # "broken data stream"
    "png_with_junk": None,
    "jpeg_with_junk": None,
    "unicode_name": None,
}


def write_all(folder: Path) -> dict[str, Path]:
    """Write every case into ``folder`` (created if needed); returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {name: writer(folder) for name, writer in WRITERS.items()}
