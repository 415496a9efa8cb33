"""Async gRPC client for the guard models on Triton.

Three calls per worker batch, each one request carrying the whole batch (Triton's dynamic
batcher also merges requests from concurrent batches and workers): the text tower, the image
tower, then the policy's head. Transport failures are transient (DependencyUnavailable).

Text in images: the worker's side of the `ocr` model on Triton.

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
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from stream_guard.errors import DependencyUnavailable
from stream_guard.settings import TritonSettings

__all__ = [
    "EMBED_DIM",
    "GuardModels",
    "MAX_SIDE",
    "N_SIGNALS",
    "OCR_MODEL",
    "image_text",
    "prepare_for_ocr",
    "read_text",
]

EMBED_DIM = 384
N_SIGNALS = 18


class GuardModels:
    def __init__(self, settings: TritonSettings) -> None:
        self.settings = settings
        root = None
        if settings.root_certificates:
            root = str(settings.root_certificates)
        self.client = grpcclient.InferenceServerClient(
            settings.url, ssl=settings.ssl, root_certificates=root
        )

    async def _infer(
        self, model: str, inputs: list[grpcclient.InferInput], output: str, version: str = ""
    ) -> np.ndarray:
        try:
            result = await self.client.infer(
                model,
                inputs,
                model_version=version,
                outputs=[grpcclient.InferRequestedOutput(output)],
                client_timeout=self.settings.timeout_s,
            )
        except InferenceServerException as e:
            raise DependencyUnavailable("triton", f"{model}: {e.message()}") from e
        array = result.as_numpy(output)
        if array is None:
            raise DependencyUnavailable("triton", f"{model} returned no {output}")
        return array

    async def embed_texts(self, texts: Sequence[str], chunk: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, EMBED_DIM), np.float32)
        parts = []
        for i in range(0, len(texts), chunk):
            batch = np.array([[t.encode("utf-8")] for t in texts[i : i + chunk]], dtype=np.object_)
            inp = grpcclient.InferInput("TEXT", list(batch.shape), "BYTES")
            inp.set_data_from_numpy(batch)
            parts.append(await self._infer(self.settings.text_model, [inp], "EMBEDDING"))
        return np.concatenate(parts).astype(np.float32)

    async def detect(self, images: np.ndarray, chunk: int = 32) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, N_SIGNALS), np.float32)
        parts = []
        for i in range(0, len(images), chunk):
            batch = np.ascontiguousarray(images[i : i + chunk], dtype=np.uint8)
            inp = grpcclient.InferInput("IMAGE", list(batch.shape), "UINT8")
            inp.set_data_from_numpy(batch)
            parts.append(await self._infer(self.settings.image_model, [inp], "SIGNALS"))
        return np.concatenate(parts).astype(np.float32)

    async def score(
        self,
        model: str,
        version: int,
        embeddings: np.ndarray,
        signals: np.ndarray,
        chunk: int = 128,
    ) -> np.ndarray:
        parts = []
        for i in range(0, len(embeddings), chunk):
            emb = np.ascontiguousarray(embeddings[i : i + chunk], dtype=np.float32)
            sig = np.ascontiguousarray(signals[i : i + chunk], dtype=np.float32)
            a = grpcclient.InferInput("TEXT_EMBEDDING", list(emb.shape), "FP32")
            a.set_data_from_numpy(emb)
            b = grpcclient.InferInput("IMAGE_SIGNALS", list(sig.shape), "FP32")
            b.set_data_from_numpy(sig)
            parts.append(await self._infer(model, [a, b], "SCORES", version=str(version)))
        return np.concatenate(parts)

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready(client_timeout=2))
        except Exception:
            return False

    async def load_model(self, name: str) -> None:
        try:
            await self.client.load_model(name, client_timeout=60)
        except InferenceServerException as e:
            raise DependencyUnavailable("triton", f"loading {name}: {e.message()}") from e

    async def close(self) -> None:
        await self.client.close()


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
