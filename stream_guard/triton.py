"""Async gRPC client for the guard models on Triton.

Three calls per worker batch, each one request carrying the whole batch (Triton's dynamic
batcher also merges requests from concurrent batches and workers): the text tower, the image
tower, then the policy's head. Transport failures are transient (DependencyUnavailable).

With an image guard configured (``triton.image_tower``: an exported CLIP / SigLIP image tower,
and its raw-text tower), uploads with images also go through that pair and the policy's image
head (``policy/image_head.py``). What the worker must know about the towers (input size, resize
rule, temperature, identity) is read from their Triton configs (the ``stream_guard.export``
parameter that ``stream-guard model export`` writes), so a worker needs no shared files.

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
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from stream_guard.errors import ConfigError, DependencyUnavailable, ErrorCode, InferenceError
from stream_guard.observability import cpu_stage
from stream_guard.settings import TritonSettings

__all__ = [
    "EMBED_DIM",
    "EXPORT_PARAMETER",
    "GuardModels",
    "ImageGuard",
    "ServedTower",
    "MAX_SIDE",
    "N_SIGNALS",
    "OCR_MODEL",
    "image_text",
    "prepare_for_ocr",
    "read_text",
]

EMBED_DIM = 384
N_SIGNALS = 18


# Bound on concurrent OCR requests per batch: one request per image would otherwise fan out
# 32 uploads x 16 images = 512 requests, above the model's queue limit.
MAX_OCR_CONCURRENCY = 8
# gRPC's default reconnect backoff (1 s x1.6 up to 120 s) makes recovery time grow with the
# outage; capped here, the worker reconnects within ~2 s of Triton being ready again.
RECONNECT_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's own defaults (message sizes, keepalive) plus the reconnect bounds:
    passing channel_args replaces its defaults, so they are restated here."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    k = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", k.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", k.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", k.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", k.http2_max_pings_without_data),
        *RECONNECT_ARGS,
    ]


def triton_error(model: str, e: InferenceServerException) -> Exception:
    """INVALID_ARGUMENT is about this input (permanent, dead-letter it); anything else is
    Triton being unavailable or overloaded (transient, retry)."""
    if "INVALID_ARGUMENT" in str(e.status() or ""):
        return InferenceError(
            ErrorCode.INFERENCE_REJECTED, f"{model} refused the input: {e.message()}", stage="infer"
        )
    return DependencyUnavailable("triton", f"{model}: {e.message()}")


EXPORT_PARAMETER = "stream_guard.export"  # written by build.export.export_parameter


@dataclass(frozen=True)
class ServedTower:
    """One exported tower as Triton serves it, with its export description."""

    name: str
    version: str
    info: dict

    @property
    def model_version(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def fingerprint(self) -> str:
        return f"{self.model_version}:{str(self.info.get('sha256', ''))[:16]}"


@dataclass(frozen=True)
class ImageGuard:
    """The dual encoder the image heads are compiled in: image tower and raw-text tower."""

    image: ServedTower
    text: ServedTower

    @property
    def embed_dim(self) -> int:
        return int(self.image.info["embed_dim"])

    @property
    def logit_scale(self) -> float:
        return float(self.image.info["logit_scale"])

    @property
    def fingerprint(self) -> str:
        return f"{self.image.fingerprint}|{self.text.fingerprint}"

    def tower_input(self):
        from stream_guard.media.decode import TowerInput

        i = self.image.info
        return TowerInput(int(i["image_size"]), str(i["resize"]), int(i["resample"]))


def _export_info(name: str, config: dict) -> dict:
    raw = config.get("config", config).get("parameters", {}).get(EXPORT_PARAMETER, {})
    try:
        info = json.loads(raw.get("string_value", ""))
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise ConfigError(
            f"{name} carries no {EXPORT_PARAMETER} parameter: serve a tower written by "
            "`stream-guard model export --repository` (it records the preprocessing there)"
        )
    return info


# One request input: its name, the rows (an array, or the strings of a BYTES input), the dtype.
Tensor = tuple[str, "np.ndarray | Sequence[str]", str]
_NUMPY = {"UINT8": np.uint8, "FP32": np.float32}


def _input(name: str, rows: np.ndarray | Sequence[str], dtype: str) -> grpcclient.InferInput:
    if dtype == "BYTES":  # one string per row, UTF-8, shape [N, 1]
        array = np.array([[t.encode("utf-8")] for t in rows], dtype=np.object_)
    else:
        array = np.ascontiguousarray(rows, dtype=_NUMPY[dtype])
    inp = grpcclient.InferInput(name, list(array.shape), dtype)
    inp.set_data_from_numpy(array)
    return inp


class GuardModels:
    def __init__(self, settings: TritonSettings) -> None:
        self.settings = settings
        # The served text tower's width: MiniLM's until a head probe reads the served config.
        self.embed_width = EMBED_DIM
        self._image_guard: ImageGuard | None = None
        self._cpu_instances: dict[str, int] = {}
        root = None
        if settings.root_certificates:
            root = str(settings.root_certificates)
        self.client = grpcclient.InferenceServerClient(
            settings.url, ssl=settings.ssl, root_certificates=root, channel_args=channel_args()
        )

    async def _infer(
        self, model: str, tensors: Sequence[Tensor], output: str, version: str = ""
    ) -> np.ndarray:
        """One request; its tensors are built and its output read under the ``score`` CPU
        stage (the gRPC transport runs inside the ``await`` and counts as the rest)."""
        with cpu_stage("score"):
            inputs = [_input(*t) for t in tensors]
            outputs = [grpcclient.InferRequestedOutput(output)]
        try:
            result = await self.client.infer(
                model,
                inputs,
                model_version=version,
                outputs=outputs,
                client_timeout=self.settings.timeout_s,
            )
        except InferenceServerException as e:
            raise triton_error(model, e) from e
        with cpu_stage("score"):
            array = result.as_numpy(output)
        if array is None:
            raise DependencyUnavailable("triton", f"{model} returned no {output}")
        return array

    async def embed_texts(self, texts: Sequence[str], chunk: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.embed_width), np.float32)
        parts = []
        for i in range(0, len(texts), chunk):
            batch = ("TEXT", texts[i : i + chunk], "BYTES")
            parts.append(await self._infer(self.settings.text_model, [batch], "EMBEDDING"))
        return np.concatenate(parts).astype(np.float32)

    async def cpu_instances(self, model: str) -> int:
        """How many CPU instances the served ``model`` runs side by side (1 for a GPU model, or
        when its config cannot be read now); read once per model."""
        n = self._cpu_instances.get(model)
        if n is None:
            try:
                config = await self.client.get_model_config(
                    model, as_json=True, client_timeout=self.settings.timeout_s
                )
            except InferenceServerException:
                return 1  # asked again next batch; the request itself reports the outage
            groups = config.get("config", config).get("instance_group", [])
            n = sum(int(g.get("count", 1)) for g in groups if g.get("kind") == "KIND_CPU")
            n = self._cpu_instances[model] = max(n, 1)
        return n

    async def detect(self, images: np.ndarray, chunk: int = 32) -> np.ndarray:
        """Detector signals per image. A batch goes as one request per CPU instance of the
        detector, sent together: each instance runs single-threaded, so one request of 3 images
        would take 3 images' time on one core while the other instance waits (a GPU model, one
        instance, gets the whole batch)."""
        model = self.settings.image_model
        if len(images) == 0 or not model:  # "": no detector configured
            return np.zeros((len(images), N_SIGNALS), np.float32)
        size = min(chunk, -(-len(images) // await self.cpu_instances(model)))
        parts = await asyncio.gather(
            *(
                self._infer(model, [("IMAGE", images[i : i + size], "UINT8")], "SIGNALS")
                for i in range(0, len(images), size)
            )
        )
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
            tensors = [
                ("TEXT_EMBEDDING", embeddings[i : i + chunk], "FP32"),
                ("IMAGE_SIGNALS", signals[i : i + chunk], "FP32"),
            ]
            parts.append(await self._infer(model, tensors, "SCORES", version=str(version)))
        return np.concatenate(parts)

    # -- the image guard (exported CLIP / SigLIP towers) --------------------------------------

    @property
    def image_text_tower(self) -> str:
        s = self.settings
        if s.image_text_tower or not s.image_tower:
            return s.image_text_tower
        return s.image_tower.removesuffix("_image_encoder") + "_text_embedder"

    async def _served_tower(self, name: str, role: str) -> ServedTower:
        try:
            if self.settings.model_repository is not None and not await self._is_ready(name):
                await self.load_model(name)  # this worker manages the repository's models
            config = await self.client.get_model_config(name, as_json=True)
            meta = await self.client.get_model_metadata(name, as_json=True)
        except InferenceServerException as e:
            raise DependencyUnavailable("triton", f"{role} {name} is not served: {e}") from e
        info = _export_info(name, config)
        if info.get("tower") != role:
            raise ConfigError(f"{name} is an exported {info.get('tower')} tower, not a {role} one")
        versions = sorted(meta.get("versions", ["1"]), key=int)
        return ServedTower(name, versions[-1], info)

    async def _is_ready(self, name: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(name, client_timeout=5))
        except InferenceServerException:
            return False

    @property
    def known_image_guard(self) -> ImageGuard | None:
        """The image guard once ``image_guard()`` has read it (heads are resolved first)."""
        return self._image_guard

    async def image_guard(self) -> ImageGuard | None:
        """The configured image guard (read from Triton once), or None when none is."""
        if not self.settings.image_tower:
            return None
        if self._image_guard is None:
            image = await self._served_tower(self.settings.image_tower, "image")
            text = await self._served_tower(self.image_text_tower, "text")
            for key in ("embed_dim", "source", "kind"):
                if image.info.get(key) != text.info.get(key):
                    raise ConfigError(
                        f"{image.name} and {text.name} are not one dual encoder ({key}: "
                        f"{image.info.get(key)!r} != {text.info.get(key)!r})"
                    )
            self._image_guard = ImageGuard(image, text)
        return self._image_guard

    async def embed_images(self, images: np.ndarray, chunk: int = 32) -> np.ndarray:
        """uint8 [N, S, S, 3] already sized for the image tower -> embeddings [N, E]."""
        parts = []
        for i in range(0, len(images), chunk):
            batch = ("IMAGE", images[i : i + chunk], "UINT8")
            parts.append(await self._infer(self.settings.image_tower, [batch], "EMBEDDING"))
        return np.concatenate(parts).astype(np.float32)

    async def embed_image_texts(self, texts: Sequence[str], chunk: int = 32) -> np.ndarray:
        """Texts embedded by the image guard's text tower (the images' embedding space)."""
        parts = []
        for i in range(0, len(texts), chunk):
            batch = ("TEXT", texts[i : i + chunk], "BYTES")
            parts.append(await self._infer(self.image_text_tower, [batch], "EMBEDDING"))
        return np.concatenate(parts).astype(np.float32)

    async def image_scores(
        self, model: str, version: int, images: np.ndarray, captions: np.ndarray, chunk: int = 128
    ) -> np.ndarray:
        """The policy's image head: image and caption embeddings -> IMAGE_SCORES [N, C]."""
        parts = []
        for i in range(0, len(images), chunk):
            tensors = [
                ("IMAGE_EMBEDDING", images[i : i + chunk], "FP32"),
                ("CAPTION_EMBEDDING", captions[i : i + chunk], "FP32"),
            ]
            parts.append(await self._infer(model, tensors, "IMAGE_SCORES", version=str(version)))
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
        with cpu_stage("score"):
            inp = _input("IMAGE", image[None], "UINT8")
        try:
            result = await client.infer(
                model,
                [inp],
                outputs=[grpcclient.InferRequestedOutput("TEXT")],
                client_timeout=timeout_s,
            )
        except InferenceServerException as e:
            raise triton_error(model, e) from e
        out = result.as_numpy("TEXT")
        if out is None:
            raise DependencyUnavailable("triton", f"{model} returned no TEXT")
        raw = out.reshape(-1)[0]
        return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)

    gate = asyncio.Semaphore(MAX_OCR_CONCURRENCY)

    async def bounded(image: np.ndarray) -> str:
        async with gate:
            return await one(image)

    return list(await asyncio.gather(*(bounded(i) for i in images)))
