"""Async gRPC client for the guard models on Triton.

Three calls per worker batch, each one request carrying the whole batch (Triton's dynamic
batcher also merges requests from concurrent batches and workers): the text tower, the image
tower, then the policy's head. Transport failures are transient (DependencyUnavailable).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from .errors import DependencyUnavailable
from .settings import TritonSettings

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
