"""Images for reviewers: decoded by the worker's hardened decoder, re-encoded small.

The browser never receives the uploaded bytes (a hostile file aimed at the reviewer's browser, a
decompression bomb, an SVG with script) nor an S3 URL: only a JPEG the service drew from pixels
that passed the same checks as in the fast path.
"""

from __future__ import annotations

import io

from PIL import Image

from stream_guard.media.decode import ImageLimits, decode_image
from stream_guard.settings import MediaSettings

__all__ = ["render_for_review"]


def render_for_review(
    data: bytes, content_type: str | None, media: MediaSettings, max_bytes: int, max_side: int
) -> bytes:
    """JPEG of the upload's first frame, longest side at most ``max_side``; raises MediaError."""
    limits = ImageLimits(
        max_bytes=max_bytes,
        max_pixels=media.max_pixels,
        max_side=media.max_side,
        max_frames=media.max_frames,
    )
    decoded = decode_image(data, content_type=content_type, limits=limits)
    image = Image.fromarray(decoded.rgb)
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()
