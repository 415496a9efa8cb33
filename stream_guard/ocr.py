"""Text in images: the worker's side of the `ocr` model on Triton.

Only uploads whose policy says ``ocr: true`` pay for it. The worker sends each decoded image
(upright RGB, its longest side capped at ``MAX_SIDE`` so a huge upload is not shipped whole)
as one request, concurrently; the model (PP-OCR from ``rapidocr-onnxruntime``, see
``model_repository/cpu/ocr``) answers the lines it read, top to bottom.

The text read from an upload's images is scored as its own text, beside the caption, and each
category keeps the higher of the two scores. It is not pasted onto the caption before embedding:
mean pooling dilutes a short threat under a benign caption (measured with the default policy:
"I WILL KILL YOU" alone scores S1 0.73, "my weekend photos" plus that line scores 0.30, below
the 0.35 allow threshold), and an upload is as unsafe as its worst part, as with its images.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from .errors import DependencyUnavailable

OCR_MODEL = "ocr"
MAX_SIDE = 1280  # PP-OCR reads at <= 960 px on the longest side; more only costs bandwidth


def prepare_for_ocr(rgb: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """Contiguous uint8 RGB [H, W, 3] with the longest side at most ``max_side`` (area filter)."""
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    from PIL import Image

    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX), dtype=np.uint8)


def image_text(lines: Sequence[str]) -> str:
    """The text of an upload's images as one string (blank reads dropped)."""
    return "\n".join(t.strip() for t in lines if t and t.strip())


async def read_text(
    client, images: Sequence[np.ndarray], *, model: str = OCR_MODEL, timeout_s: float = 30.0
) -> list[str]:
    """OCR each image through Triton (``client``: a tritonclient.grpc.aio client); one string
    per image. Transport and server errors are transient (the batch is retried)."""
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    async def one(image: np.ndarray) -> str:
        batch = np.ascontiguousarray(image[None], dtype=np.uint8)
        inp = grpcclient.InferInput("IMAGE", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        try:
            result = await client.infer(
                model,
                [inp],
                outputs=[grpcclient.InferRequestedOutput("TEXT")],
                client_timeout=timeout_s,
            )
        except InferenceServerException as e:
            raise DependencyUnavailable("triton", f"{model}: {e.message()}") from e
        out = result.as_numpy("TEXT")
        if out is None:
            raise DependencyUnavailable("triton", f"{model} returned no TEXT")
        raw = out.reshape(-1)[0]
        return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)

    return list(await asyncio.gather(*(one(i) for i in images)))
