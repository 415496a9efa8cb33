"""A corpus of hostile, broken and awkward-but-valid uploads, generated (no committed binaries).

``hostile_corpus()`` returns every case with the dead-letter code ``decode_image`` must raise under
the default ``ImageLimits``, or ``None`` for a file that must decode. Built once per process.

Polyglots, and why each is or is not an image. stream-guard judges pixels: a file whose real
format parses and decodes is moderated as that image, and bytes it never interprets (data after a
PNG's IEND or a JPEG's EOI) change nothing in what is shown, so they do not make it invalid.
Stripping such payloads is the job of the platform's re-encode step, not of the moderator. A file
whose leading bytes claim an image format but whose image structure is absent or absurd is not an
image and is dead-lettered.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stream_guard.errors import ErrorCode

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class HostileCase:
    name: str
    data: bytes
    content_type: str | None
    expected_code: ErrorCode | None  # None: must decode to uint8 [H, W, 3]
    why: str = ""


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with gradients and noise (compresses like a photo, roughly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            x * 255 // max(1, width - 1),
            y * 255 // max(1, height - 1),
            (x + y) * 127 // max(1, width + height - 2),
        ],
        axis=-1,
    )
    noise = rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_ihdr(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    return png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    )


def png_from_rows(
    width: int, height: int, row: bytes, bit_depth: int, colour_type: int, extra: bytes = b""
) -> bytes:
    """A hand-built PNG whose every scanline is ``row`` (filter 0), streamed through zlib."""
    z = zlib.compressobj(9)
    line = b"\x00" + row
    idat = b"".join(z.compress(line) for _ in range(height)) + z.flush()
    return (
        PNG_SIGNATURE
        + png_ihdr(width, height, bit_depth, colour_type)
        + extra
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def gif_frame_flood(frames: int) -> bytes:
    """A 1x1 GIF with ``frames`` one-pixel frames (about 23 bytes each)."""
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    one = (
        b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
        + b"\x02\x02\x44\x01\x00"
    )  # LZW: clear, index 0, end
    return header + loop + one * frames + b";"


def progressive_scan_flood(scans: int) -> bytes:
    """A progressive JPEG with one tiny refinement scan repeated: cheap bytes, costly decode."""
    data = encode(Image.new("L", (1000, 1000), 128), "JPEG", progressive=True, quality=90)
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    end = data.rfind(b"\xff\xd9")
    bounds = list(zip(starts, starts[1:] + [end], strict=True))
    small = min((data[a:b] for a, b in bounds[1:]), key=len)
    return data[:end] + small * scans + data[end:]


def with_jpeg_sof_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (a baseline JPEG) with its SOF0 header claiming another size."""
    i = data.find(b"\xff\xc0")
    return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]


def apng_declaring(frames: int) -> bytes:
    """A real 4x4 PNG whose acTL chunk claims ``frames`` frames (a frame-count flood by header)."""
    actl = png_chunk(b"acTL", struct.pack(">II", frames, 0))
    fctl = png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 4, 4, 0, 0, 1, 10, 0, 0))
    return png_from_rows(4, 4, b"\x80" * 12, 8, 2, extra=actl + fctl)


def zip_of(name: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(name, payload)
    return buf.getvalue()


@functools.cache
def hostile_corpus() -> list[HostileCase]:
    c = ErrorCode
    jpeg = encode(photo(64, 48), "JPEG", quality=85)
    png = encode(photo(64, 48, seed=1), "PNG")
    cases: list[HostileCase] = []

    def add(name: str, data: bytes, ct: str | None, code: ErrorCode | None, why: str = ""):
        cases.append(HostileCase(name, data, ct, code, why))

    # --- truncated and corrupt --------------------------------------------------------------
    add("jpeg_truncated_at_half", jpeg[: len(jpeg) // 2], "image/jpeg", c.IMAGE_UNDECODABLE)
    add("png_truncated_inside_idat", png[: len(png) * 2 // 3], "image/png", c.IMAGE_UNDECODABLE)
    add("png_signature_only", PNG_SIGNATURE, "image/png", c.IMAGE_UNDECODABLE)
    add(
        "png_header_without_pixel_data",
        PNG_SIGNATURE + png_ihdr(4, 4) + png_chunk(b"IEND", b""),
        "image/png",
        c.IMAGE_UNDECODABLE,
    )
    broken = bytearray(png)
    broken[png.find(b"IDAT") + 40] ^= 0xFF
    add("png_idat_corrupted", bytes(broken), "image/png", c.IMAGE_UNDECODABLE)
    add(
        "gif_magic_and_screen_but_no_frame",
        b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0) + b";",
        "image/gif",
        c.IMAGE_UNDECODABLE,
    )

    # --- dimensions and decompression bombs -------------------------------------------------
    add(
        "png_ihdr_0x0",
        PNG_SIGNATURE + png_ihdr(0, 0) + png_chunk(b"IEND", b""),
        "image/png",
        c.IMAGE_DIMENSIONS,
    )
    add(
        "png_ihdr_0_wide",
        PNG_SIGNATURE + png_ihdr(0, 100) + png_chunk(b"IEND", b""),
        None,
        c.IMAGE_DIMENSIONS,
    )
    add(
        "png_ihdr_100000x100000",
        PNG_SIGNATURE + png_ihdr(100_000, 100_000) + png_chunk(b"IEND", b""),
        "image/png",
        c.IMAGE_DIMENSIONS,
    )
    add(
        "png_16385x1_one_past_max_side",
        png_from_rows(16_385, 1, b"\x00" * 16_385, 8, 0),
        "image/png",
        c.IMAGE_DIMENSIONS,
    )
    add(
        "png_bomb_10000x10000_1bit",
        png_from_rows(10_000, 10_000, b"\x00" * 1250, 1, 0),
        "image/png",
        c.IMAGE_DECOMPRESSION_BOMB,
        "100 megapixels that really inflate, from about 15 KB",
    )
    add(
        "jpeg_sof_claims_16000x16000",
        with_jpeg_sof_size(jpeg, 16_000, 16_000),
        "image/jpeg",
        c.IMAGE_DECOMPRESSION_BOMB,
    )
    add(
        "bmp_header_100000_wide",
        b"BM" + struct.pack("<IHHIIiiHH", 70, 0, 0, 54, 40, 100_000, 1, 1, 24) + b"\x00" * 40,
        "image/bmp",
        c.IMAGE_DIMENSIONS,
    )
    add(
        "webp_vp8x_canvas_16777216_square",
        b"RIFF"
        + struct.pack("<I", 22)
        + b"WEBPVP8X"
        + struct.pack("<I", 10)
        + b"\x00\x00\x00\x00"
        + b"\xff\xff\xff"
        + b"\xff\xff\xff",
        "image/webp",
        c.IMAGE_DIMENSIONS,
    )
    add(
        "gif_frame_65535_square_on_1x1_screen",
        b"GIF89a"
        + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, 65_535, 65_535, 0)
        + b"\x02\x02\x44\x01\x00;",
        "image/gif",
        c.IMAGE_DECOMPRESSION_BOMB,
        "caught by Pillow's own guard, mapped",
    )
    add(
        "png_ztxt_inflates_to_50mb",
        png_from_rows(
            4,
            4,
            b"\x80" * 12,
            8,
            2,
            extra=png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * (50 << 20), 9)),
        ),
        "image/png",
        c.IMAGE_DECOMPRESSION_BOMB,
    )
    add(
        "jpeg_progressive_2000_scans",
        progressive_scan_flood(2000),
        "image/jpeg",
        c.IMAGE_DECOMPRESSION_BOMB,
        "about 100 KB that would take a core for ~20 s",
    )

    # --- frame floods -----------------------------------------------------------------------
    add("gif_5000_frames", gif_frame_flood(5000), "image/gif", c.IMAGE_TOO_MANY_FRAMES)
    add(
        "apng_declares_100000_frames",
        apng_declaring(100_000),
        "image/apng",
        c.IMAGE_TOO_MANY_FRAMES,
    )
    pages = [Image.new("L", (1, 1), i % 256) for i in range(400)]
    add(
        "tiff_400_pages",
        encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]),
        "image/tiff",
        c.IMAGE_TOO_MANY_FRAMES,
    )

    # --- not images -------------------------------------------------------------------------
    add(
        "svg",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" '
        b'height="10"><script>alert(1)</script></svg>',
        "image/svg+xml",
        c.IMAGE_UNSUPPORTED_FORMAT,
    )
    add(
        "html",
        b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
        "text/html",
        c.IMAGE_UNSUPPORTED_FORMAT,
    )
    add(
        "pdf",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n",
        "application/pdf",
        c.IMAGE_UNSUPPORTED_FORMAT,
    )
    add("zip", zip_of("readme.txt", b"hello"), "application/zip", c.IMAGE_UNSUPPORTED_FORMAT)
    add("plain_text", b"just a caption, not a picture\n", "text/plain", c.IMAGE_UNSUPPORTED_FORMAT)
    add("zero_bytes", b"", None, c.IMAGE_UNSUPPORTED_FORMAT)
    noise = random.Random(1234).randbytes(4096)
    add("random_bytes", b"\x00" + noise[1:], None, c.IMAGE_UNSUPPORTED_FORMAT)
    add(
        "ico_is_an_image_but_not_allowed",
        encode(photo(16, 16), "ICO"),
        "image/x-icon",
        c.IMAGE_UNSUPPORTED_FORMAT,
    )

    # --- polyglots --------------------------------------------------------------------------
    add(
        "polyglot_gif_magic_then_html",
        b"GIF89a<html><script>alert(1)</script></html>",
        "image/gif",
        c.IMAGE_DIMENSIONS,
        "a GIF by its magic; its screen descriptor is the text '<htm': 26684 px wide",
    )
    add(
        "polyglot_gif_screen_then_html",
        b"GIF89a"
        + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b"<html><script>alert(1)</script></html>",
        "image/gif",
        c.IMAGE_UNDECODABLE,
        "a sane GIF header with HTML where the frames should be: no image in it",
    )
    add(
        "polyglot_jpeg_with_zip_appended",
        jpeg + zip_of("payload.html", b"<script>x</script>"),
        "image/jpeg",
        None,
        "a complete JPEG; the ZIP after EOI is never interpreted",
    )
    add(
        "polyglot_png_with_html_after_iend",
        png + b"<html><script>alert(1)</script></html>",
        "image/png",
        None,
        "a complete PNG; bytes after IEND are never interpreted",
    )
    add(
        "polyglot_zip_with_png_inside",
        zip_of("image.png", png),
        "image/png",
        c.IMAGE_UNSUPPORTED_FORMAT,
        "a ZIP by its leading bytes; we do not unpack archives",
    )

    # --- size and declared type -------------------------------------------------------------
    add(
        "over_size_limit_by_one_byte",
        png + b"\x00" * (20 * 1024 * 1024 + 1 - len(png)),
        "image/png",
        c.MEDIA_TOO_LARGE,
    )
    add("png_declared_image_jpeg", png, "image/jpeg", c.IMAGE_CONTENT_TYPE_MISMATCH)
    add("jpeg_declared_text_html", jpeg, "text/html", c.IMAGE_CONTENT_TYPE_MISMATCH)
    add("jpeg_declared_image_svg", jpeg, "image/svg+xml", c.IMAGE_CONTENT_TYPE_MISMATCH)
    add("jpeg_declared_image_jpg_alias", jpeg, "image/jpg", None)
    add("jpeg_declared_with_parameters", jpeg, "Image/JPEG; charset=binary", None)
    add("png_declared_octet_stream", png, "application/octet-stream", None)
    add("png_declared_nothing", png, None, None)

    # --- valid, in awkward modes ------------------------------------------------------------
    add("cmyk_jpeg", encode(photo(40, 30).convert("CMYK"), "JPEG"), "image/jpeg", None)
    grey16 = np.arange(32 * 16, dtype=np.uint16).reshape(16, 32) * 127
    add("png_16bit_grey", encode(Image.fromarray(grey16), "PNG"), "image/png", None)
    add(
        "png_16bit_rgb",
        png_from_rows(8, 8, b"\xff\xff\x80\x00\x00\x00" * 8, 16, 2),
        "image/png",
        None,
    )
    pal = photo(32, 32).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    add("png_palette_with_transparency", encode(pal, "PNG", transparency=0), "image/png", None)
    add("png_rgba", encode(photo(20, 20).convert("RGBA"), "PNG"), "image/png", None)
    add("png_grey_alpha", encode(photo(20, 20).convert("LA"), "PNG"), "image/png", None)
    add("png_1bit", encode(photo(20, 20).convert("1"), "PNG"), "image/png", None)
    add("png_grey", encode(photo(20, 20).convert("L"), "PNG"), "image/png", None)
    add("jpeg_grey", encode(photo(20, 20).convert("L"), "JPEG"), "image/jpeg", None)
    exif = Image.Exif()
    exif[0x0112] = 6
    add("jpeg_exif_orientation_6", encode(photo(20, 10), "JPEG", exif=exif), "image/jpeg", None)
    add("webp_lossy", encode(photo(40, 30), "WEBP", quality=80), "image/webp", None)
    add(
        "webp_lossless_rgba",
        encode(photo(40, 30).convert("RGBA"), "WEBP", lossless=True),
        "image/webp",
        None,
    )
    frames = [photo(16, 16, seed=s) for s in range(3)]
    add(
        "webp_animated_3_frames",
        encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "image/webp",
        None,
    )
    add("gif_animated_10_frames", gif_frame_flood(10), "image/gif", None)
    add("gif_still", encode(photo(24, 24), "GIF"), "image/gif", None)
    add("bmp_24bit", encode(photo(30, 20), "BMP"), "image/bmp", None)
    add("bmp_8bit_palette", encode(photo(30, 20).convert("P"), "BMP"), "image/x-ms-bmp", None)
    add("tiff_rgb_lzw", encode(photo(30, 20), "TIFF", compression="tiff_lzw"), "image/tiff", None)
    add(
        "tiff_float32_grey",
        encode(Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)), "TIFF"),
        "image/tiff",
        None,
    )
    add(
        "tiff_3_pages",
        encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "image/tiff",
        None,
    )
    add(
        "mpo_two_pictures_declared_jpeg",
        encode(frames[0], "MPO", save_all=True, append_images=frames[1:2]),
        "image/jpeg",
        None,
    )
    add("png_1x1", encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), "image/png", None)
    add(
        "png_16384x2_at_max_side",
        png_from_rows(16_384, 2, b"\x7f" * 16_384, 8, 0),
        "image/png",
        None,
    )
    add(
        "png_6000x6000_huge_but_allowed",
        png_from_rows(6000, 6000, b"\x40" * 6000, 8, 0),
        "image/png",
        None,
        "36 megapixels, under the 40 megapixel limit",
    )
    return cases
