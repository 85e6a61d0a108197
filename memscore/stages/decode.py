"""The CPU decode stage: a row's image bytes -> (width, height, error, uint8 pixel arrays).

``DecodeImages`` is a Ray Data ``map_batches`` callable over pyarrow tables (and a plain function
over them too). For every row it gets the image's bytes from ``memscore.stages.fetch`` (local paths and
any fsspec URL, e.g. ``s3://``, the same way; or the bytes a WebDataset row carries), decodes
them with Pillow as the published models' reference pipeline does
(``Image.open(path).convert('RGB')``), and runs each model's ``ImagePreprocess.to_array`` on the
result, so several models can share one decode. ``decode_image_bytes`` is that decode for one
image's bytes, shared with ``memscore serve``.

A row that cannot be read or decoded for a reason in the image itself never fails the batch: it
gets a ``memscore_error`` string ``"{kind}: {detail}"`` with one of a small set of stable kinds
(``ERROR_KINDS``, ``memscore.row_errors``), null width/height, and all-zero pixels. A failure
that says nothing about the image (the network, storage, credentials, ``MemoryError`` while
decoding) is no row error: the rows are read and decoded again with backoff until reads have
failed for ``transient_retry_s`` with none getting through, then the batch fails with
``TransientFailure``; a storage client configured wrong fails it at once with
``StorageConfigError`` (``memscore.stages.fetch`` draws those lines, keeps the clock and runs the
retries). Rows out == rows in, in the same order, and every input column is passed through
untouched.

Decoding choices. By default a file decodes to the very pixels the published packages' own recipe
gives (``Image.open(path).convert('RGB')``: every pixel, in the stored orientation; for animated
GIF/APNG/WebP the first frame), with one departure: 16-bit and 32-bit greyscale modes are scaled
to 8 bits, where Pillow's own convert clips them and turns a 16-bit photo white, so the
reference's score there means nothing (see ``_to_rgb``).

Two options depart from the reference on purpose, both off by default (``DecodeImages``):

* ``exif_transpose``: apply the EXIF orientation tag (``ImageOps.exif_transpose``), so a photo
  stored sideways is scored upright; images without the tag are unchanged. The reference ignores
  the tag. The size columns then report the displayed orientation, else the stored one.
* ``fast_decode``: JPEG draft mode for large JPEGs: a JPEG at least ``DRAFT_FACTOR`` (4) times
  the largest resize target on both sides is decoded by libjpeg at 1/2, 1/4 or 1/8 scale, never
  below twice the target. Less memory and time for big photos, slightly different pixels;
  smaller images stay bit-identical. The ``memscore_width``/``memscore_height`` columns report
  the full-resolution size, not the draft's.

The measured effect of both on scores, time and memory is in ``docs/decoding.md``.

Limits and errors (the reading limits, ``max_bytes`` and ``confine_to``, are ``memscore.stages.fetch``'s):

* Decompression bombs are refused from the declared size (``max_pixels``), before any pixel is
  decoded. Pillow's own process-wide ``Image.MAX_IMAGE_PIXELS`` is raised to ``max_pixels`` where
  it is lower (never lowered), so a limit above Pillow's default takes effect. PNG text
  chunks (zTXt/iTXt) that decompress past Pillow's ``PngImagePlugin.MAX_TEXT_CHUNK`` /
  ``MAX_TEXT_MEMORY`` are "decompression bomb" errors too.
* Truncated files are errors (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default, False).
  libjpeg itself tolerates some damage (e.g. an end-of-image marker in the middle of the entropy
  coded data decodes, the rest grey); what Pillow accepts is accepted.
* Memory: the pixels being decoded at once by one stage instance are bounded by
  ``max_inflight_pixels`` (declared, post-draft pixel counts), whatever ``io_threads`` is.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from memscore.columns import (
    ERROR as ERROR_COLUMN,
    HEIGHT as HEIGHT_COLUMN,
    PIXELS_PREFIX,
    WIDTH as WIDTH_COLUMN,
    pixels_column,
)
from memscore.row_errors import (
    ERROR_KINDS,  # noqa: F401
    ImageDecodeError,
)

# Kept for existing imports (``from memscore.stages.decode import ...``): these names now live in
# memscore.stages.fetch (reading a row's bytes, transient or a fact) and memscore.row_errors.
from memscore.stages.fetch import (  # noqa: F401
    DEFAULT_MAX_BYTES,
    DEFAULT_TRANSIENT_RETRY_S,
    RETRYABLE_KINDS,
    RetryClock,
    RowFetcher,
    StorageConfigError,
    TransientError,
    TransientFailure,
    local_read_error,
    remote_read_error,
    resolve_path,
    retry_transient,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as _PILImage

    from memscore.models.transforms import ImagePreprocess

__all__ = [
    "DRAFT_FACTOR",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_INFLIGHT_PIXELS",
    "DEFAULT_MAX_PIXELS",
    "ERROR_COLUMN",
    "ERROR_KINDS",
    "DEFAULT_TRANSIENT_RETRY_S",
    "HEIGHT_COLUMN",
    "RETRYABLE_KINDS",
    "StorageConfigError",
    "TransientError",
    "TransientFailure",
    "local_read_error",
    "remote_read_error",
    "PIXELS_PREFIX",
    "WIDTH_COLUMN",
    "DecodeImages",
    "decode_image_bytes",
    "ImageDecodeError",
    "pixels_column",
    "read_image",
    "resolve_path",
]


DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS
DEFAULT_MAX_INFLIGHT_PIXELS = 2 * DEFAULT_MAX_PIXELS
#: fast_decode: JPEGs at least this many times the largest resize side on both sides are drafted.
DRAFT_FACTOR = 4
#: Formats whose decoder supports ``Image.draft`` scaling (libjpeg's DCT scaling).
_DRAFT_FORMATS = ("JPEG", "MPO")

# ``warnings.catch_warnings`` swaps the process-wide filter list and is not thread-safe: two threads
# inside it at once can leave each other's filter installed or removed. Every use in this module
# (only around ``Image.open``, which parses the header, not the pixels) takes this lock.
_WARNINGS_LOCK = threading.Lock()
# Guards raising Pillow's process-wide Image.MAX_IMAGE_PIXELS (see _allow_in_pillow).
_PILLOW_LIMIT_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------- decode
def _to_rgb(image: _PILImage.Image) -> _PILImage.Image:
    """Any Pillow mode -> RGB, scaling wide greyscale modes instead of clipping them.

    Pillow's ``convert('RGB')`` (and ``convert('L')``) clips I;16/I/F values to 0..255, so a 16-bit
    photo comes out almost all white. Deliberate choices here:

    * ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (unsigned 16-bit): ``value >> 8``, i.e. keep the
      high byte (floor of value / 256; 0 -> 0, 65535 -> 255). Same as Pillow does for 16-bit RGB PNGs.
    * ``I`` (32-bit signed): treated as a 16-bit container, since that is what it holds in practice
      (16-bit PNGs opened by older Pillow, 16-bit TIFFs): clipped to 0..65535, then ``>> 8``.
    * ``F`` (32-bit float): NaN -> 0; if every value lies within 0..1 the image is taken as
      normalised and scaled by 255 (rounded); otherwise values are clipped to 0..255 as Pillow does.

    Every other mode (L, P, RGBA, CMYK, LA, PA, 1, YCbCr, ...) uses ``convert('RGB')``, exactly as
    the reference pipeline does.
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image)
        if arr.dtype.kind not in "ui":
            raise ValueError(f"unexpected array dtype {arr.dtype} for mode {mode}")
        arr = np.clip(arr.astype(np.int64, copy=False), 0, 65535)
        grey = (arr >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def _exif_transpose(image: _PILImage.Image) -> _PILImage.Image:
    """Apply the EXIF orientation tag, if any (tag values 2..8). A broken EXIF block is ignored."""
    from PIL import ImageOps

    try:
        orientation = image.getexif().get(0x0112, 1)  # ExifTags.Base.Orientation
    except Exception:  # malformed EXIF: the pixels are still fine
        return image
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return image  # exif_transpose would only make a copy
    return ImageOps.exif_transpose(image)


def _text_bomb(exc: BaseException, where: str) -> ImageDecodeError | None:
    """Pillow's PNG text-chunk limits (zTXt/iTXt decompressing past MAX_TEXT_CHUNK, or all text
    chunks together past MAX_TEXT_MEMORY) -> a "decompression bomb" error; else None."""
    message = str(exc)
    if isinstance(exc, ValueError) and (
        "MAX_TEXT_CHUNK" in message or "MAX_TEXT_MEMORY" in message
    ):
        return ImageDecodeError("decompression bomb", f"PNG text chunk {where}: {message}")
    return None


def _allow_in_pillow(max_pixels: int) -> None:
    """Raise Pillow's ``Image.MAX_IMAGE_PIXELS`` to at least ``max_pixels``; never lower it.

    ``Image.open`` checks that process-wide limit before memscore's own ``max_pixels`` check
    (it warns above it, which is an error here, and raises above twice it), so without this a
    ``max_pixels`` above Pillow's default (89.5 megapixels) would still refuse those images. The
    decode stage's own check stays the one that decides: the global only stops being in its way.
    In a Ray decode worker this is a per-process setting of that worker.
    """
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or limit >= max_pixels:  # the common case: no lock taken
        return
    with _PILLOW_LIMIT_LOCK:
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _open_image(data: bytes, max_pixels: int) -> _PILImage.Image:
    """bytes -> lazily opened PIL image (header parsed, no pixels decoded), its size checked."""
    from PIL import Image, UnidentifiedImageError

    _allow_in_pillow(max_pixels)
    if not data:
        raise ImageDecodeError("empty file", "0 bytes")
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("decompression bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "not an image", f"Pillow cannot identify the format ({len(data)} bytes)"
        ) from None
    except MemoryError:
        raise  # transient: says nothing about the image (see DecodeImages)
    except Exception as exc:
        raise _text_bomb(exc, "in the header") or ImageDecodeError(
            "not an image", f"{type(exc).__name__}: {exc}"
        ) from None
    try:
        width, height = image.size
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageDecodeError("decode failed", f"{type(exc).__name__}: {exc}") from None
    if width * height > max_pixels:
        raise ImageDecodeError(
            "decompression bomb",
            f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels} ({image.format})",
        )
    return image


def _draft(image: _PILImage.Image, draft_to: int) -> None:
    """JPEG draft mode (in place) when the image is >= DRAFT_FACTOR * draft_to on both sides.

    Asks libjpeg for the largest 1/2, 1/4, 1/8 reduction that keeps both sides >= 2 * draft_to.
    The target is one side for both axes, so an EXIF rotation cannot make one side too small.
    """
    if draft_to <= 0 or image.format not in _DRAFT_FORMATS:
        return
    if min(image.size) >= DRAFT_FACTOR * draft_to:
        try:
            image.draft("RGB", (2 * draft_to, 2 * draft_to))
        except Exception:  # a decoder that cannot draft: decode at full size
            pass


def _load_rgb(image: _PILImage.Image, exif_transpose: bool = False) -> _PILImage.Image:
    """Opened image -> decoded RGB image (first frame, wide modes scaled; EXIF-transposed if
    ``exif_transpose``)."""
    from PIL import Image

    try:
        try:
            image.load()  # frame 0; forces the decode so truncation shows up here
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError("decompression bomb", str(exc)) from None
        except (OSError, EOFError, SyntaxError, ValueError) as exc:
            bomb = _text_bomb(exc, "after the image data")
            if bomb is not None:
                raise bomb from None
            message = str(exc)
            if isinstance(exc, EOFError) or "truncat" in message.lower():
                raise ImageDecodeError(
                    "truncated", f"{image.format}: {message or type(exc).__name__}"
                ) from None
            raise ImageDecodeError(
                "decode failed", f"{type(exc).__name__}: {message} ({image.format})"
            ) from None
        if exif_transpose:
            image = _exif_transpose(image)
        return _to_rgb(image)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as exc:
        raise ImageDecodeError("decode failed", f"{type(exc).__name__}: {exc}") from None


def read_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_to: int = 0,
    exif_transpose: bool = False,
) -> _PILImage.Image:
    """bytes -> RGB PIL image (first frame, 16-bit scaled), as the reference decodes it by default.

    ``draft_to`` > 0 enables JPEG draft mode for JPEGs at least ``DRAFT_FACTOR * draft_to`` pixels
    on both sides (the result then keeps both sides >= ``2 * draft_to``, and is smaller than the
    file's full size); ``DecodeImages(fast_decode=True)`` sets it from its preprocessing.
    ``exif_transpose`` applies the EXIF orientation tag. Both off by default, as in the reference.

    Raises:
        ImageDecodeError: kinds "empty file", "not an image", "decompression bomb", "truncated",
            "decode failed".

    Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` is raised to ``max_pixels`` where it is lower,
    so a ``max_pixels`` above Pillow's default takes effect.
    """
    image = _open_image(data, max_pixels)
    _draft(image, draft_to)
    return _load_rgb(image, exif_transpose)


def decode_image_bytes(
    data: bytes,
    preprocess: Mapping[str, ImagePreprocess],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_to: int = 0,
    exif_transpose: bool = False,
    budget: _PixelBudget | None = None,
) -> tuple[int, int, dict[str, np.ndarray]]:
    """One image's bytes -> ``(width, height, {name: uint8 pixels})``: a row of ``DecodeImages``.

    This is the decode of every row of the batch job (``DecodeImages`` calls it once it has the
    bytes), so anything else that has an image's bytes in hand (``memscore serve``'s uploads)
    gets the same pixels, and hence the same scores.

    Args:
        data: the file's bytes.
        preprocess: name -> ``ImagePreprocess``; one array of its ``array_shape`` each.
        max_pixels: a larger declared size is a "decompression bomb" error, before any decoding.
        draft_to: JPEG draft mode's target side (``read_image``); 0 decodes every pixel.
        exif_transpose: apply the EXIF orientation tag first.
        budget: a ``DecodeImages`` instance's pixel budget, held while the pixels exist.

    Returns:
        The decoded size (the full-resolution size under draft mode; the displayed orientation
        with ``exif_transpose``, else the stored one) and the pixel arrays.

    Raises:
        ImageDecodeError: "empty file", "not an image", "truncated", "decompression bomb",
            "decode failed".

    Example:
        >>> from memscore.models import get_model_weights
        >>> pre = {"resmem": get_model_weights("resmem").DEFAULT.transforms}
        >>> with open("examples/images/chelsea.png", "rb") as f:
        ...     width, height, arrays = decode_image_bytes(f.read(), pre)
        >>> width, height, arrays["resmem"].shape
        (451, 300, (227, 227, 3))
    """
    image = _open_image(data, max_pixels)
    del data  # the image keeps its own reference to the bytes
    full_w, full_h = image.size  # before draft: the size reported
    _draft(image, draft_to)
    stored_w, stored_h = image.size  # what will be decoded
    held = budget.acquire(stored_w * stored_h) if budget is not None else 0
    try:
        image = _load_rgb(image, exif_transpose)
        if (stored_w, stored_h) == (full_w, full_h):  # no draft: the decoded size
            full_w, full_h = image.size
        elif image.size == (stored_h, stored_w):  # drafted, then EXIF-rotated by 90 degrees
            full_w, full_h = full_h, full_w
        arrays = {name: pre.to_array(image) for name, pre in preprocess.items()}
        del image
    finally:
        if budget is not None:
            budget.release(held)
    return full_w, full_h, arrays


class _PixelBudget:
    """A counting budget of pixels, first come first served (no starvation of big images).

    ``acquire(n)`` blocks until it is the oldest waiter and ``min(n, total)`` pixels are free, and
    returns that amount, to hand back to ``release``; an image larger than the whole budget
    therefore runs alone. Each thread holds at most one reservation at a time, so it cannot
    deadlock; a waiter interrupted by an exception gives up its place in the queue.
    """

    def __init__(self, total: int):
        self.total = int(total)
        self.free = self.total
        self._cond = threading.Condition()
        self._next_ticket = 0  # next ticket handed out
        self._serving = 0  # the ticket whose turn it is
        self._abandoned: set[int] = set()  # tickets whose waiter left the queue

    def _advance(self) -> None:  # with the lock held
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()

    def acquire(self, n: int) -> int:
        n = max(0, min(int(n), self.total))
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            try:
                self._cond.wait_for(lambda: self._serving == ticket and self.free >= n)
            except BaseException:
                if self._serving == ticket:
                    self._advance()
                else:
                    self._abandoned.add(ticket)
                raise
            self.free -= n
            self._advance()
        return n

    def release(self, n: int) -> None:
        with self._cond:
            self.free += n
            if self.free > self.total:  # pragma: no cover - a bug; never silently over-credit
                raise RuntimeError("pixel budget released more than it handed out")
            self._cond.notify_all()


# ----------------------------------------------------------------------------------------- stage
class DecodeImages:
    """Ray Data ``map_batches`` callable (``batch_format='pyarrow'``); also usable as a plain function.

    Args:
        path_column: column holding the image paths (strings; nulls allowed).
        preprocess: name -> ``ImagePreprocess``; one pixel column ``pixels_column(name)`` each.
        base_dir: folder that relative paths resolve against (local or a URL such as ``s3://b/p``).
        storage_options: keyword arguments for ``fsspec.core.url_to_fs`` (e.g. S3 credentials).
        max_pixels: images declaring more pixels than this are "decompression bomb" errors.
        io_threads: threads fetching and decoding the rows of one batch.
        max_bytes: files larger than this are "too large" errors (never read whole).
        max_inflight_pixels: pixel budget of one instance: rows wait before decoding until their
            declared (post-draft) pixel count fits, and give it back once their arrays are made.
            An image larger than the whole budget decodes alone. Bounds peak memory to roughly
            ``max_inflight_pixels`` x (bytes per pixel of the decode) whatever ``io_threads`` is.
        fast_decode: JPEGs at least ``DRAFT_FACTOR`` (4) x the largest ``resize`` side of any
            preprocess entry on both sides decode in libjpeg draft mode (1/2, 1/4 or 1/8 scale,
            never below twice that side): less memory and time, slightly different pixels, so
            scores no longer equal the published package's. Smaller images are untouched. Off by
            default: every pixel is decoded, as the reference does. The size columns report the
            full-resolution size either way.
        exif_transpose: apply the EXIF orientation tag before preprocessing, so the size columns
            and the pixels are the displayed orientation. Off by default: the reference ignores
            the tag, and the size columns report the stored orientation.
        confine_to: a local folder. When set, a local path (plain or ``file://``) whose real path
            (symlinks resolved) is not inside the folder's real path is an "outside input folder"
            error, and the file read is the checked real path. Remote URLs are not affected.
        transient_retry_s: how long rows whose read failed for a reason that says nothing about
            the image (``remote_read_error``, ``local_read_error``: network errors and
            timeouts, 5xx and throttling, 403/expired or missing credentials, EIO on a mount,
            ``MemoryError``) are read again, with exponential backoff from 1 s to 60 s, a new
            client each round. The clock (``fetch.RetryClock``) starts at the batch's first
            such failure and starts again whenever a read gets through; once reads have
            failed for ``transient_retry_s`` with none getting through, the next failure
            gives up: reads not yet started are not started, and ``TransientFailure`` fails
            the task at most one request's timeout later (an S3 read is one request, bounded
            by ``connect_timeout`` and ``read_timeout``: 5 s and 15 s unless the storage
            options say otherwise). Such a row is never committed as an error. Facts about
            the image stay row errors; a storage client configured wrong (an invalid endpoint
            URL, ``user:pass@`` in it, an invalid region ...) fails the task at once with
            ``StorageConfigError``.
        bytes_column: a column holding each row's image bytes, read instead of a path (a
            WebDataset sample's image member, ``columns.IMAGE``). The table then comes with its
            ``memscore_error`` column (the shard reader's per-sample errors): a row with an
            error is passed through undecoded, keeping it. The bytes column is dropped once
            decoded.

    Returns (from ``__call__``) the input table, untouched, with ``memscore_width``,
    ``memscore_height`` (int32: the decoded size, stored orientation unless ``exif_transpose``),
    ``memscore_error`` (string) and the pixel columns appended.

    Example:
        >>> import pyarrow as pa
        >>> from memscore.models import get_model_weights
        >>> preprocess = {"resmem": get_model_weights("resmem").DEFAULT.transforms}
        >>> decode = DecodeImages("path", preprocess)
        >>> table = decode(pa.table({"path": ["examples/images/chelsea.png", "nowhere.jpg"]}))
        >>> table.column("memscore_width").to_pylist(), table.column("memscore_error").to_pylist()
        ([451, None], [None, 'missing file: nowhere.jpg'])
        >>> table.column(pixels_column("resmem")).type.shape  # uint8, the model's input size
        (227, 227, 3)
    """

    def __init__(
        self,
        path_column: str,
        preprocess: dict[str, ImagePreprocess],
        *,
        base_dir: str | None = None,
        storage_options: dict | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        io_threads: int = 8,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_inflight_pixels: int = DEFAULT_MAX_INFLIGHT_PIXELS,
        fast_decode: bool = False,
        exif_transpose: bool = False,
        confine_to: str | None = None,
        transient_retry_s: float = DEFAULT_TRANSIENT_RETRY_S,
        bytes_column: str | None = None,
    ):
        if not preprocess:
            raise ValueError("preprocess must name at least one ImagePreprocess")
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        if max_inflight_pixels < 1:
            raise ValueError(f"max_inflight_pixels must be >= 1, got {max_inflight_pixels}")
        # reading a row's bytes: path rules, local and remote reads, transient or a fact
        self.fetcher = RowFetcher(
            base_dir=base_dir,
            storage_options=storage_options,
            max_bytes=max_bytes,
            confine_to=confine_to,
            bytes_given=bytes_column is not None,
        )
        self.path_column = path_column
        self.bytes_column = bytes_column
        self.preprocess = dict(preprocess)
        self.max_pixels = int(max_pixels)
        self.io_threads = int(io_threads)
        self.max_inflight_pixels = int(max_inflight_pixels)
        self.fast_decode = bool(fast_decode)
        self.exif_transpose = bool(exif_transpose)
        if not transient_retry_s >= 0:
            raise ValueError(f"transient_retry_s must be >= 0, got {transient_retry_s}")
        self.transient_retry_s = float(transient_retry_s)
        # the side draft mode keeps twice of: the largest resize side over all entries; 0: no draft
        self._draft_to = (
            max(max(pre.resize) for pre in self.preprocess.values()) if self.fast_decode else 0
        )
        # The fetcher pickles without its filesystems, so the instance ships to Ray workers
        # without fsspec/s3fs objects; the budget (a lock) is recreated on unpickling.
        self._budget = _PixelBudget(self.max_inflight_pixels)

    # The reading options, as given; the fetcher holds them.
    base_dir = property(lambda self: self.fetcher.base_dir)
    storage_options = property(lambda self: self.fetcher.storage_options)
    max_bytes = property(lambda self: self.fetcher.max_bytes)
    confine_to = property(lambda self: self.fetcher.confine_to)

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_budget"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._budget = _PixelBudget(self.max_inflight_pixels)

    # -------------------------------------------------------------------------------- per row
    def _decode_row(self, index: int, path: Any, out: dict[str, np.ndarray], clock: RetryClock):
        """-> (width, height, None) or (None, None, error): an error string (the row's), a
        ``TransientError`` (read again) or a ``StorageConfigError`` (fails the batch). Writes
        pixels into ``out``; reports the read to ``clock``, and reads nothing once it stopped.

        ``path`` is the row's path, or its image bytes when ``bytes_column`` is set."""
        row = path if isinstance(path, str) else f"row {index}"  # never a repr of the bytes
        if clock.stopped:  # the batch gave up: a read started now would only add its timeout
            return None, None, clock.not_read(row)
        try:
            width, height, arrays = decode_image_bytes(
                self.fetcher.row_bytes(path),
                self.preprocess,
                max_pixels=self.max_pixels,
                draft_to=self._draft_to,
                exif_transpose=self.exif_transpose,
                budget=self._budget,
            )
            for name, array in arrays.items():
                out[name][index] = array
            clock.got_through()
            return width, height, None
        except ImageDecodeError as exc:
            error = str(exc)
        except TransientError as exc:  # read again by __call__, never committed as an error
            error = exc
        except MemoryError as exc:  # says nothing about the image: transient too
            error = TransientError(row, exc)
        except StorageConfigError as exc:  # no read can succeed: the batch fails at once
            clock.stop()
            error = exc
        except Exception as exc:  # any other per-row problem: never fail the batch
            error = str(ImageDecodeError("decode failed", f"{type(exc).__name__}: {exc}"))
        if isinstance(error, TransientError):
            clock.failed(error)
        elif isinstance(error, str):
            clock.got_through()
        for arr in out.values():
            arr[index] = 0  # to_array may have filled some columns before failing
        return None, None, error

    def _decode_rows(
        self,
        indices: list[int],
        paths: list,
        out: dict[str, np.ndarray],
        results: list,
        clock: RetryClock,
    ) -> list:
        """Decode the rows at ``indices`` (in ``io_threads`` threads) into ``results``; a
        client configuration error raises its ``StorageConfigError`` once they are done."""
        todo = [paths[i] for i in indices]
        if len(indices) <= 1 or self.io_threads == 1:
            done = [self._decode_row(i, p, out, clock) for i, p in zip(indices, todo)]
        else:
            with ThreadPoolExecutor(
                max_workers=min(self.io_threads, len(indices)), thread_name_prefix="memscore-decode"
            ) as pool:
                done = list(
                    pool.map(
                        self._decode_row,
                        indices,
                        todo,
                        [out] * len(indices),
                        [clock] * len(indices),
                    )
                )
        for i, result in zip(indices, done):
            results[i] = result
        config = next((r[2] for r in done if isinstance(r[2], StorageConfigError)), None)
        if config is not None:
            raise config
        return results

    def _retry_transient(
        self, paths: list, out: dict[str, np.ndarray], results: list, clock: RetryClock
    ) -> list:
        """Read and decode the rows that failed transiently again (``fetch.retry_transient``:
        backoff, a new client each round), until they succeed or become facts; once ``clock``
        gives up, ``TransientFailure`` fails the task."""

        def read_again(indices: list[int]) -> dict[int, TransientError]:
            self._decode_rows(indices, paths, out, results, clock)
            return {i: results[i][2] for i in indices if isinstance(results[i][2], TransientError)}

        waiting = {i: r[2] for i, r in enumerate(results) if isinstance(r[2], TransientError)}
        retry_transient(waiting, read_again, fetcher=self.fetcher, clock=clock, rows=len(paths))
        return results

    # ---------------------------------------------------------------------------------- batch
    def __call__(self, table: pa.Table) -> pa.Table:
        from ray.data.extensions import ArrowTensorArray

        source = self.bytes_column or self.path_column
        if source not in table.column_names:
            raise KeyError(
                f"{'bytes' if self.bytes_column else 'path'} column {source!r} not in "
                f"the table: {table.column_names}"
            )
        added = [WIDTH_COLUMN, HEIGHT_COLUMN, ERROR_COLUMN, *map(pixels_column, self.preprocess)]
        given_errors = None
        if self.bytes_column is not None and ERROR_COLUMN in table.column_names:
            given_errors = table.column(ERROR_COLUMN).to_pylist()
            table = table.drop_columns([ERROR_COLUMN])
        clash = [c for c in added if c in table.column_names]
        if clash:
            raise ValueError(f"input table already has columns the decode stage adds: {clash}")

        paths = table.column(source).to_pylist()
        n = len(paths)
        out = {
            name: np.zeros((n, *pre.array_shape), dtype=np.uint8)
            for name, pre in self.preprocess.items()
        }
        todo = list(range(n))
        results: list = [None] * n
        if given_errors is not None:  # the reader's per-sample errors stand; those rows wait
            todo = [i for i in todo if given_errors[i] is None]
            for i in range(n):
                if given_errors[i] is not None:
                    results[i] = (None, None, given_errors[i])
        clock = RetryClock(self.transient_retry_s)  # the batch's: its first failure starts it
        results = self._decode_rows(todo, paths, out, results, clock)
        results = self._retry_transient(paths, out, results, clock)

        if self.bytes_column is not None:  # decoded: the bytes need not travel on to the model
            table = table.drop_columns([self.bytes_column])
        widths = pa.array([r[0] for r in results], type=pa.int32())
        heights = pa.array([r[1] for r in results], type=pa.int32())
        errors = pa.array([r[2] for r in results], type=pa.string())
        table = table.append_column(WIDTH_COLUMN, widths)
        table = table.append_column(HEIGHT_COLUMN, heights)
        table = table.append_column(ERROR_COLUMN, errors)
        for name, arr in out.items():
            table = table.append_column(pixels_column(name), ArrowTensorArray.from_numpy(arr))
        return table
