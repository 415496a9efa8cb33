"""Decoding untrusted image uploads into RGB pixels, and preparing them for the detector.

Pure functions (no network, no asyncio): the worker calls them in a thread pool. The order of
the checks is the point: everything that can be decided from a few header bytes (size, real
format, declared content type, dimensions, frame count, progressive-scan count) is decided
before Pillow allocates or decodes a single pixel, so a hostile upload costs almost nothing.

``decode_image`` raises only :class:`~stream_guard.errors.MediaError` for any input bytes; every
other exception from Pillow is wrapped (``IMAGE_UNDECODABLE``, cause chained). Pillow's global
knobs (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) are never touched: our
own limits come first and Pillow's decompression-bomb guard stays as a second line of defence.

Decoding only what the models need (issue 14): given a :class:`NeededSize`, a JPEG is decoded
at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's ``draft``) as long as the decoded
image still has the resolution every model that reads it needs. Every check above still runs on
the file's real size first; only the pixels are fewer.
"""

from __future__ import annotations

import functools
import io
import logging
import struct
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stream_guard.errors import ErrorCode, MediaError

__all__ = [
    "DETECTOR_SIZE",
    "DecodedImage",
    "DetectorInput",
    "ImageLimits",
    "NeededSize",
    "RESAMPLE",
    "SUPPORTED_FORMATS",
    "TowerInput",
    "decode_image",
    "header_dimensions",
    "preprocess_for_detector",
    "preprocess_for_tower",
    "sniff_format",
]

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})

# Declared content types that name each format; anything else under image/* is a mismatch.
_CONTENT_TYPES: dict[str, frozenset[str]] = {
    "JPEG": frozenset({"image/jpeg", "image/jpg", "image/pjpeg"}),
    "PNG": frozenset({"image/png", "image/x-png", "image/apng"}),
    "WEBP": frozenset({"image/webp"}),
    "GIF": frozenset({"image/gif"}),
    "BMP": frozenset({"image/bmp", "image/x-bmp", "image/x-ms-bmp"}),
    "TIFF": frozenset({"image/tiff", "image/x-tiff"}),
}
# "We don't know": S3 stores binary/octet-stream when an uploader sets no type.
_UNTYPED = frozenset({"", "application/octet-stream", "binary/octet-stream"})

# JPEG start-of-frame markers (SOF0-SOF15 minus DHT C4, JPG C8, DAC CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Modes whose pixels need our own scaling instead of Pillow's clipping convert().
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_BAND_BYTES = 4 << 20  # convert in bands of about this many source bytes


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may be. Defaults suit photos and short animations from end users.

    ``max_jpeg_scans`` bounds the number of progressive-JPEG scans: each scan re-walks the
    whole coefficient buffer, so a 100 KB file with thousands of scans costs a core for tens
    of seconds while staying far below every size and pixel limit.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 16_384
    min_side: int = 1
    max_frames: int = 300
    allowed_formats: frozenset[str] = field(default=SUPPORTED_FORMATS)
    max_jpeg_scans: int = 100

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side", "min_side", "max_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_side > self.max_side:
            raise ValueError("ImageLimits.min_side must not exceed max_side")
        if self.max_jpeg_scans < 1:
            raise ValueError("ImageLimits.max_jpeg_scans must be >= 1")
        formats = frozenset(f.upper() for f in self.allowed_formats)
        if not formats or not formats <= SUPPORTED_FORMATS:
            raise ValueError(
                f"ImageLimits.allowed_formats must be a non-empty subset of "
                f"{sorted(SUPPORTED_FORMATS)}, got {sorted(self.allowed_formats)}"
            )
        object.__setattr__(self, "allowed_formats", formats)


@dataclass(frozen=True)
class NeededSize:
    """The least resolution the models that read an image need from it.

    The decoded image keeps its longest side >= ``longest`` and its shortest side >=
    ``shortest`` (0: no need). ``a | b`` is what both need: one decode serves every model.
    """

    longest: int = 0
    shortest: int = 0

    def __or__(self, other: NeededSize) -> NeededSize:
        return NeededSize(max(self.longest, other.longest), max(self.shortest, other.shortest))

    def reduction(self, width: int, height: int) -> int:
        """The largest JPEG scale denominator (8, 4, 2; else 1) that keeps this resolution."""
        for k in (8, 4, 2):
            w, h = -(-width // k), -(-height // k)  # libjpeg rounds scaled sizes up
            if width >= k and height >= k and max(w, h) >= self.longest:
                if min(w, h) >= self.shortest:
                    return k
        return 1


# NudeNet 320n pads to a square and resizes it to 320: it needs the longest side at 320.
DETECTOR_SIZE = NeededSize(longest=320)


@dataclass(frozen=True)
class DecodedImage:
    """The first frame of an upload as upright RGB: ``rgb`` is read-only uint8 [H, W, 3].

    ``reduced`` > 1: a JPEG decoded at 1/``reduced`` of its size because the caller needed no
    more (``decode_image(needed=...)``); ``width`` and ``height`` are the decoded pixels.
    """

    rgb: np.ndarray
    width: int
    height: int
    format: str  # the sniffed format (MPO is reported as JPEG)
    frames: int  # frames in the file; only the first is decoded
    orientation_applied: bool  # an EXIF orientation other than 1 was applied
    reduced: int = 1


def decode_image(
    data: bytes,
    *,
    content_type: str | None,
    limits: ImageLimits = ImageLimits(),
    needed: NeededSize | None = None,
) -> DecodedImage:
    """Validate and decode one untrusted upload; raise only MediaError for bad input.

    ``content_type`` is what the uploader declared (None or octet-stream: not checked).
    ``needed``: decode a JPEG at a reduced scale that still gives this resolution (None: full
    resolution). Other formats always decode at full resolution.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode_image takes bytes, got {type(data).__name__}")
    data = bytes(data)  # no copy for bytes
    try:
        return _decode(data, content_type, limits, needed)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own guard (a warning too when warnings are errors): the header we could not
        # read ourselves, or a GIF frame larger than its screen.
        raise _error(ErrorCode.IMAGE_DECOMPRESSION_BOMB, str(e)) from e
    except MemoryError as e:
        raise _error(
            ErrorCode.IMAGE_DECOMPRESSION_BOMB, "out of memory while decoding the image"
        ) from e
    except ValueError as e:
        # PngImagePlugin's zTXt/iTXt/iCCP guard: compressed metadata that inflates without end.
        msg = str(e)
        code = (
            ErrorCode.IMAGE_DECOMPRESSION_BOMB
            if "too large" in msg.lower() or "too much memory" in msg.lower()
            else ErrorCode.IMAGE_UNDECODABLE
        )
        raise _error(code, f"{type(e).__name__}: {msg}") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, struct.error, EOFError, ...
        raise _error(ErrorCode.IMAGE_UNDECODABLE, f"{type(e).__name__}: {e}") from e


def _error(code: ErrorCode, reason: str) -> MediaError:
    return MediaError(code, reason, stage="decode")


def _decode(
    data: bytes, content_type: str | None, limits: ImageLimits, needed: NeededSize | None
) -> DecodedImage:
    size = len(data)
    if size > limits.max_bytes:
        raise _error(
            ErrorCode.MEDIA_TOO_LARGE, f"{size} bytes exceeds the limit of {limits.max_bytes}"
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise _error(ErrorCode.IMAGE_UNSUPPORTED_FORMAT, f"unsupported format: {_describe(data)}")
    if fmt not in limits.allowed_formats:
        raise _error(
            ErrorCode.IMAGE_UNSUPPORTED_FORMAT,
            f"{fmt} is not allowed (allowed: {', '.join(sorted(limits.allowed_formats))})",
        )
    _check_content_type(content_type, fmt)
    header_size = header_dimensions(data, fmt)
    if header_size is not None:
        _check_dimensions(header_size, limits, "header")
    if fmt == "JPEG":
        scans = data.count(b"\xff\xda")  # SOS markers; 0xFF is byte-stuffed in entropy data
        if scans > limits.max_jpeg_scans:
            raise _error(
                ErrorCode.IMAGE_DECOMPRESSION_BOMB,
                f"JPEG has {scans} scans (limit {limits.max_jpeg_scans}): decode-cost bomb",
            )

    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except UnidentifiedImageError as e:
        # The magic bytes say `fmt`, but its header does not parse: a broken file. (Pillow's
        # message names the BytesIO's address, which would make the reason vary per attempt.)
        raise _error(ErrorCode.IMAGE_UNDECODABLE, f"{fmt} header is corrupt or incomplete") from e
    with im:
        _check_dimensions(im.size, limits, "image")
        frames = _count_frames(im, data, fmt, limits.max_frames)
        if frames > limits.max_frames:
            raise _error(
                ErrorCode.IMAGE_TOO_MANY_FRAMES,
                f"{frames} or more frames, over the limit of {limits.max_frames}",
            )
        reduced = _load(im, limits, needed if fmt == "JPEG" else None)
        oriented, orientation_applied = _apply_orientation(im)
        rgb = _to_rgb(oriented)
    rgb.flags.writeable = False
    height, width = rgb.shape[:2]
    return DecodedImage(rgb, width, height, fmt, frames, orientation_applied, reduced)


def _load(im: Image.Image, limits: ImageLimits, needed: NeededSize | None) -> int:
    """Decode the first frame (at 1/k scale when ``needed`` allows a JPEG draft); returns k.
    Raises OSError on truncated data."""
    reduced = _draft(im, needed) if needed is not None else 1
    expected = im.size
    im.load()
    if reduced == 1:
        _check_dimensions(im.size, limits, "decoded image")
    elif im.size != expected:  # the file's real size was checked before the draft
        raise _error(
            ErrorCode.IMAGE_UNDECODABLE,
            f"JPEG decoded at 1/{reduced} scale to {im.size}, expected {expected}",
        )
    return reduced


def _draft(im: Image.Image, needed: NeededSize) -> int:
    """Ask libjpeg for a 1/k scale decode (k from ``needed``); the k Pillow accepted."""
    width, height = im.size
    k = needed.reduction(width, height)
    if k == 1:
        return 1
    # Pillow picks the largest k in 8, 4, 2 with k <= min(W // w, H // h): for w = W // k that
    # is exactly k (W // (W // k) < 2k). It declines (None) for multi-tile images.
    drafted = im.draft(None, (width // k, height // k))
    if drafted is None:
        return 1
    _, box = drafted
    return round(width / box[2])


def sniff_format(data: bytes) -> str | None:
    """The format the leading bytes prove, among the formats this module decodes."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:2] == b"BM" and len(data) >= 26:
        return "BMP"
    return None


def _describe(data: bytes) -> str:
    """A readable guess at what a non-image upload is, for the dead-letter reason."""
    if not data:
        return "empty object"
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"%pdf"):
        return "PDF document"
    if head.startswith((b"pk\x03\x04", b"pk\x05\x06", b"pk\x07\x08")):
        return "ZIP archive"
    if b"<svg" in head:
        return "SVG document"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "HTML document"
    if head.startswith(b"<"):
        return "XML/markup document"
    try:
        data[:1024].decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < min(len(data), 1024) - 3:  # not just a character cut at the boundary
            return f"unknown signature {data[:8].hex()}"
    return "text"


def _check_content_type(content_type: str | None, fmt: str) -> None:
    if content_type is None:
        return
    declared = content_type.split(";", 1)[0].strip().lower()
    if declared in _UNTYPED or declared in _CONTENT_TYPES[fmt]:
        return
    raise _error(
        ErrorCode.IMAGE_CONTENT_TYPE_MISMATCH,
        f"declared content type {content_type!r} but the bytes are {fmt}",
    )


def _check_dimensions(size: tuple[int, int], limits: ImageLimits, where: str) -> None:
    w, h = size
    if min(w, h) < limits.min_side or max(w, h) > limits.max_side:
        raise _error(
            ErrorCode.IMAGE_DIMENSIONS,
            f"{where} is {w}x{h}; each side must be {limits.min_side}..{limits.max_side}",
        )
    if w * h > limits.max_pixels:
        raise _error(
            ErrorCode.IMAGE_DECOMPRESSION_BOMB,
            f"{where} is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}",
        )


def header_dimensions(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) read from the first header bytes, or None when unsure.

    Only an early reject: Pillow's parsed size is checked again afterwards.
    """
    try:
        if fmt == "PNG" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "GIF":
            return struct.unpack("<HH", data[6:10])
        if fmt == "BMP":
            (header,) = struct.unpack("<I", data[14:18])
            if header == 12:
                return struct.unpack("<HH", data[18:22])
            w, h = struct.unpack("<ii", data[18:26])
            return w, abs(h)
        if fmt == "WEBP":
            return _webp_dimensions(data)
        if fmt == "JPEG":
            return _jpeg_dimensions(data)
        if fmt == "TIFF":
            return _tiff_dimensions(data)
    except (struct.error, IndexError):
        return None
    return None


def _webp_dimensions(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in _JPEG_SOF:
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        elif marker in (0xD9, 0xDA):  # end of image, or scan data before any frame
            return None
        else:
            (length,) = struct.unpack(">H", data[i + 2 : i + 4])
            i += 2 + length
    return None


def _tiff_dimensions(data: bytes) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    if struct.unpack(order + "H", data[2:4])[0] != 42:  # BigTIFF: let Pillow read it
        return None
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    found: dict[int, int] = {}
    for k in range(count):
        entry = data[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257) and kind in (3, 4):
            value = entry[8:10] if kind == 3 else entry[8:12]
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), value)[0]
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


def _count_frames(im: Image.Image, data: bytes, fmt: str, limit: int) -> int:
    """Frames in the file, counting no further than ``limit + 1`` and decoding none."""
    if fmt == "GIF":
        # Pillow's n_frames parses every frame of a flood; our walk stops past the limit.
        return max(1, _gif_frames(data, limit + 1))
    if fmt == "TIFF":
        # One IFD at a time (parsing only). Not seek(limit): when that overshoots, Pillow 13
        # records n_frames as limit + 1 whatever the real count.
        count = 1
        try:
            while count <= limit:
                im.seek(count)
                count += 1
        except EOFError:
            pass
        finally:
            im.seek(0)
        return count
    # PNG (acTL), WEBP (demuxer), MPO (index): read from a header, no frame walk.
    return int(getattr(im, "n_frames", 1))


def _gif_frames(data: bytes, stop_after: int) -> int:
    frames = 0
    try:
        flags = data[10]
        i = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
        n = len(data)
        while i < n:
            tag = data[i]
            if tag == 0x21:  # extension: label, then sub-blocks
                i = _skip_sub_blocks(data, i + 2)
            elif tag == 0x2C:  # image descriptor
                frames += 1
                if frames >= stop_after:
                    return frames
                lflags = data[i + 9]
                i += 10 + ((3 << ((lflags & 7) + 1)) if lflags & 0x80 else 0)
                i = _skip_sub_blocks(data, i + 1)  # after the LZW minimum code size
            else:  # trailer, or garbage after the last frame
                break
    except IndexError:
        pass
    return frames


def _skip_sub_blocks(data: bytes, i: int) -> int:
    while True:
        length = data[i]
        i += 1 + length
        if length == 0:
            return i


def _apply_orientation(im: Image.Image) -> tuple[Image.Image, bool]:
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception as e:  # noqa: BLE001 - broken EXIF is metadata, not a broken image
        log.debug("ignoring unreadable EXIF: %s", e)
        return im, False
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return im, False
    return ImageOps.exif_transpose(im), True


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode to uint8 RGB, alpha composited onto white, converted in row bands.

    Banding keeps the peak at the decoded image plus the output, instead of also holding a
    full-size RGBA/RGB copy and ``tobytes()``'s list of chunks.
    """
    w, h = im.size
    out = np.empty((h, w, 3), np.uint8)
    wide = _wide_scaler(im) if im.mode in _WIDE_MODES else None
    rows = max(1, _BAND_BYTES // (4 * w))
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        band = im.crop((0, y0, w, y1)) if (y0, y1) != (0, h) else im
        out[y0:y1] = _band_to_rgb(band, wide)
    return out


def _wide_scaler(im: Image.Image) -> float:
    """One scale for the whole image (so bands agree) mapping 16/32-bit or float to 0..255."""
    if im.mode.startswith("I;16"):
        return 1 / 257
    lo, hi = im.getextrema()
    if im.mode == "F":
        # Float images in [0, 1] are normalised; anything else is taken as 0..255 and clipped.
        return 255.0 if 0 <= lo and hi <= 1 else 1.0
    return 1 / 257 if hi > 255 else 1.0  # 32-bit "I": 16-bit data (old PNG path) or 8-bit


def _band_to_rgb(band: Image.Image, wide: float | None) -> np.ndarray:
    mode = band.mode
    if wide is not None:
        values = np.asarray(band).astype(np.float32)
        grey = np.clip(np.nan_to_num(values * wide, nan=0.0), 0, 255)
        grey = np.rint(grey).astype(np.uint8)
        transparency = band.info.get("transparency")
        if isinstance(transparency, int):
            grey[values == transparency] = 255  # tRNS colour key: transparent -> white
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "La":
        band = band.convert("LA")  # Pillow cannot go from premultiplied La to RGBA directly
        mode = "LA"
    if mode in _ALPHA_MODES or "transparency" in band.info:
        rgba = np.asarray(band.convert("RGBA"))
        alpha = rgba[:, :, 3:4].astype(np.uint16)
        mixed = (rgba[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return mixed.astype(np.uint8)
    if mode != "RGB":
        band = band.convert("RGB")
    return np.asarray(band)


# ---------------------------------------------------------------------------------------------
# Detector preprocessing


@dataclass(frozen=True)
class DetectorInput:
    """One image as the detector receives it, and how to map its boxes back.

    ``image`` is uint8 [size, size, 3], RGB. The upload was padded with black on the right
    (``pad_x``) and bottom (``pad_y``) to a square of side ``width + pad_x == height + pad_y``
    and resized to ``size``; one model pixel is ``scale`` original pixels on both axes.
    """

    image: np.ndarray
    scale: float
    pad_x: int
    pad_y: int
    width: int
    height: int

    def to_image_box(self, x: float, y: float, w: float, h: float) -> tuple[float, ...]:
        """A model-space box (top-left x, y, width, height) in original pixels, clipped.

        Same arithmetic as NudeNet 3.4.2's ``_postprocess``.
        """
        x, y, w, h = (v * self.scale for v in (x, y, w, h))
        x = max(0.0, min(x, self.width))
        y = max(0.0, min(y, self.height))
        return x, y, min(w, self.width - x), min(h, self.height - y)


def preprocess_for_detector(rgb: np.ndarray, size: int = 320) -> DetectorInput:
    """Pad to a square and resize like NudeNet 3.4.2, with numpy only (no OpenCV).

    NudeNet's ``_read_image`` pads the image with black on the right and bottom to
    ``max(H, W)`` square (``cv2.copyMakeBorder``), then ``cv2.dnn.blobFromImage(pad, 1/255,
    (320, 320), swapRB=True)``: a bilinear ``cv2.resize`` (INTER_LINEAR, half-pixel centres,
    no antialiasing) on uint8, then float32 NCHW scaled by 1/255. This function reproduces the
    uint8 resize with OpenCV's own fixed-point arithmetic (11-bit weights, its SIMD vertical
    pass), so the output matches OpenCV's to within 1 grey level (exactly, in our tests at 320).

    What Triton's ``image_detector`` receives: input ``IMAGE``, uint8, shape [B, 320, 320, 3],
    NHWC, RGB order, 0..255 - this array stacked over the batch. The wrapped graph
    (``stream_guard.build.detector``) casts it to float32, multiplies by 1/255 and transposes
    to [B, 3, 320, 320] for NudeNet's ``images`` input: the same tensor as NudeNet's blob for an
    RGB ndarray input. (Called with a file path or bytes, NudeNet reads BGR and swaps twice, so
    its blob is BGR; the 320n model is an Ultralytics YOLOv8 export, trained on RGB, and on the
    one face photo available here it scores the face 0.76 in RGB against 0.61 in BGR.)
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = rgb.shape[:2]
    if min(h, w) == 0:
        raise ValueError(f"empty image {rgb.shape}")
    side = max(h, w)
    if side == size:  # the taps are the identity: only the padding is left to do
        out = np.zeros((size, size, 3), np.uint8)
        out[:h, :w] = rgb
    elif side == 2 * size:
        out = _halve(rgb, size)
    else:
        out = _resize_linear(rgb, side, size)
    return DetectorInput(out, side / size, side - w, side - h, w, h)


def _halve(rgb: np.ndarray, size: int) -> np.ndarray:
    """An exact 2x downscale of the padded square: cv2 turns it into INTER_AREA, the rounded
    2x2 mean, which equals the linear taps below (weights 1024/1024, same rounding)."""
    h, w = rgb.shape[:2]
    if h % 2 or w % 2:  # the padding's black row / column completes the last 2x2 cell
        even = np.zeros((h + h % 2, w + w % 2, 3), np.uint8)
        even[:h, :w] = rgb
        rgb, h, w = even, h + h % 2, w + w % 2
    total = rgb[0::2, 0::2].astype(np.uint16)
    total += rgb[0::2, 1::2]
    total += rgb[1::2, 0::2]
    total += rgb[1::2, 1::2]
    total += 2
    total >>= 2
    out = np.zeros((size, size, 3), np.uint8)
    out[: h // 2, : w // 2] = total
    return out


def _resize_linear(rgb: np.ndarray, side: int, size: int) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) of ``rgb`` padded with black to ``side`` square, in OpenCV's
    own fixed-point arithmetic (horizontal pass, then its SIMD vertical pass)."""
    h, w = rgb.shape[:2]
    x0, x1, xw0, xw1 = _column_taps(side, size, w)
    y0, y1, yw0, yw1 = _linear_taps(side, size, h)
    flat = rgb.reshape(h, w * 3)
    rows = np.concatenate((y0, y1))
    # Gather along the shorter way first: rows repeat when the image has few of them.
    if h < len(rows):
        left, right = np.take(flat, x0, axis=1)[rows], np.take(flat, x1, axis=1)[rows]
    else:
        picked = flat[rows]
        left, right = np.take(picked, x0, axis=1), np.take(picked, x1, axis=1)
    # Padding reads as black: its taps carry weight 0 instead of their (clamped) pixel.
    acc = left * xw0  # uint8 x int32 -> int32 [2 * size, 3 * size]
    acc += right * xw1
    # OpenCV's VResizeLinearVec_32s8u: ((S0>>4)*b0 >> 16) + ((S1>>4)*b1 >> 16), then (+2) >> 2.
    acc >>= 4
    top, bottom = acc[:size], acc[size:]
    top *= yw0[:, None]
    top >>= 16
    bottom *= yw1[:, None]
    bottom >>= 16
    top += bottom
    top += 2
    top >>= 2  # 0..255 by construction: the weights of each pass sum to 1
    return top.astype(np.uint8).reshape(size, size, 3)


@functools.lru_cache(maxsize=64)
def _linear_taps(
    src: int, dst: int, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and 11-bit fixed-point weights of cv2's INTER_LINEAR along one axis of
    length ``src`` whose indices from ``limit`` on are padding (weight 0, index clamped)."""
    scale = src / dst
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    frac = (f - i0.astype(np.float32)).astype(np.float32)
    low = i0 < 0
    frac[low], i0[low] = 0, 0
    high = i0 >= src - 1
    frac[high], i0[high] = 0, src - 1
    w0 = np.rint((np.float32(1) - frac) * np.float32(2048)).astype(np.int32)
    w1 = np.rint(frac * np.float32(2048)).astype(np.int32)
    i1 = np.minimum(i0 + 1, src - 1)
    w0[i0 >= limit] = 0
    w1[i1 >= limit] = 0
    taps = (np.minimum(i0, limit - 1), np.minimum(i1, limit - 1), w0, w1)
    for a in taps:
        a.flags.writeable = False  # cached: shared by every call
    return taps


@functools.lru_cache(maxsize=64)
def _column_taps(
    src: int, dst: int, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``_linear_taps`` for the columns of a [rows, width * 3] RGB view: per channel."""
    i0, i1, w0, w1 = _linear_taps(src, dst, limit)
    channel = np.arange(3)
    taps = (
        (i0[:, None] * 3 + channel).ravel(),
        (i1[:, None] * 3 + channel).ravel(),
        np.repeat(w0, 3),
        np.repeat(w1, 3),
    )
    for a in taps:
        a.flags.writeable = False
    return taps


# ---------------------------------------------------------------------------------------------
# Image-tower preprocessing (exported CLIP / SigLIP encoders)

# Pillow filters by the numbers Hugging Face processor configs use for ``resample``.
RESAMPLE: dict[int, Image.Resampling] = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class TowerInput:
    """How an exported image tower wants its pixels (from its export.json / Triton config).

    ``resize``: ``squash`` resizes straight to ``size`` x ``size`` (SigLIP's processor);
    ``shortest_edge`` resizes the shorter side to ``size`` keeping the aspect ratio, then takes
    the centre ``size`` x ``size`` crop (CLIP's processor). Rescaling and mean/std normalisation
    are inside the exported graph, so the tower receives uint8.
    """

    size: int
    resize: str = "squash"
    resample: int = 3

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"TowerInput.size must be >= 1, got {self.size}")
        if self.resize not in ("squash", "shortest_edge"):
            raise ValueError(f"TowerInput.resize must be squash or shortest_edge: {self.resize!r}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"TowerInput.resample must be one of {sorted(RESAMPLE)}")

    def needed(self) -> NeededSize:
        """Both resize rules read at least ``size`` pixels along the shorter side."""
        return NeededSize(shortest=self.size)


def preprocess_for_tower(rgb: np.ndarray, tower: TowerInput) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 [size, size, 3] as the model's Hugging Face image processor
    resizes and crops it (PIL resize with the processor's filter; HF's output-size and centre
    crop arithmetic)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    if min(h, w) == 0:
        raise ValueError(f"empty image {rgb.shape}")
    s = tower.size
    if tower.resize == "squash":
        target = (s, s)
    else:  # transformers' get_resize_output_image_size(default_to_square=False)
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        target = (s, new_long) if w <= h else (new_long, s)
    im = Image.fromarray(np.ascontiguousarray(rgb))
    if im.size != target:
        im = im.resize(target, RESAMPLE[tower.resample])
    out = np.asarray(im, dtype=np.uint8)
    if out.shape[:2] != (s, s):  # transformers' center_crop: offsets rounded down
        top = (out.shape[0] - s) // 2
        left = (out.shape[1] - s) // 2
        out = out[top : top + s, left : left + s]
    return np.ascontiguousarray(out)
