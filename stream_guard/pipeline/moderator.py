"""The fast-mode stage: a batch of Kafka records in, the records to publish out.

No Kafka here: the agent hands in records and publishes what comes back, so this logic is
testable on its own. Per record the outcome is a final verdict, a provisional verdict plus an
escalation, or a dead letter. Permanent errors (bad event, missing object, hostile image) end
that one record in the DLQ; transient errors (S3 or Triton down) raise, and the agent retries
the whole batch later without acking anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import SpanKind

from stream_guard.errors import PermanentError
from stream_guard.events import UploadEvent
from stream_guard.media.storage import ObjectStore
from stream_guard.observability import extract, inject, tracer
from stream_guard.pipeline.decide import dead_letter, decide, parse_upload
from stream_guard.pipeline.records import Record, Result
from stream_guard.policy.model import IMAGE_SIGNALS
from stream_guard.policy.registry import ActiveHead, PolicyRegistry
from stream_guard.settings import Settings
from stream_guard.text import segments, windows
from stream_guard.triton import EMBED_DIM, N_SIGNALS, GuardModels

__all__ = [
    "Moderator",
]

log = logging.getLogger(__name__)


@dataclass
class _Item:
    record: Record
    upload: UploadEvent
    head: ActiveHead
    images: list[np.ndarray] = field(default_factory=list)
    trace_headers: dict[str, bytes] = field(default_factory=dict)
    signals: np.ndarray | None = None
    ocr_images: list[np.ndarray] = field(default_factory=list)  # only for `ocr: true` policies
    ocr_text: str = ""
    texts: list[str] = field(default_factory=list)  # what the text tower scores (see text.py)
    embeddings: np.ndarray | None = None
    truncated: bool = False


def _head_rows(group: list[_Item]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The head's input rows for a group: one row per text segment (zero embedding for an item
    without text), image signals on each item's first row only; ``owner`` maps rows to items."""
    embs, sigs, owner = [], [], []
    for n, i in enumerate(group):
        item_embs = i.embeddings if i.embeddings is not None and len(i.embeddings) else None
        if item_embs is None:
            item_embs = np.zeros((1, EMBED_DIM), np.float32)
        for k, e in enumerate(item_embs):
            embs.append(e)
            sigs.append(i.signals if k == 0 else np.zeros(N_SIGNALS, np.float32))
            owner.append(n)
    return np.stack(embs), np.stack(sigs), np.asarray(owner)


class Moderator:
    """Turns batches of upload records into verdicts, escalations and dead letters."""

    def __init__(
        self, settings: Settings, models: GuardModels, store: ObjectStore, registry: PolicyRegistry
    ) -> None:
        self.settings = settings
        self.models = models
        self.store = store
        self.registry = registry
        self._decode_pool = ThreadPoolExecutor(settings.media.decode_workers, "decode")

    async def _load_image(self, ref, ocr: bool = False):
        with tracer().start_as_current_span("s3 get", kind=SpanKind.CLIENT) as span:
            span.set_attribute("s3.uri", ref.uri)
            obj = await self.store.fetch(ref)
        loop = asyncio.get_running_loop()
        with tracer().start_as_current_span("image decode"):
            return await loop.run_in_executor(
                self._decode_pool,
                self._decode,
                obj.data,
                ref.content_type or obj.content_type,
                ocr,
            )

    def _decode(self, data: bytes, content_type: str | None, ocr: bool = False):
        from stream_guard.media.decode import ImageLimits, decode_image, preprocess_for_detector

        m = self.settings.media
        limits = ImageLimits(
            max_bytes=self.settings.s3.max_object_bytes,
            max_pixels=m.max_pixels,
            max_side=m.max_side,
            max_frames=m.max_frames,
        )
        image = decode_image(data, content_type=content_type, limits=limits)
        prepared = preprocess_for_detector(image.rgb).image
        if ocr:  # the OCR model reads the image near its own resolution, not the 320px thumbnail
            from stream_guard.triton import prepare_for_ocr

            return prepared, prepare_for_ocr(image.rgb)
        return prepared

    async def _prepare(self, record: Record) -> _Item | Result:
        # One span per upload, child of the producer's context: one trace per upload.
        with tracer().start_as_current_span(
            f"{record.topic} process",
            context=extract(record.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset,
            },
        ) as span:
            headers = inject()
            try:
                upload = parse_upload(record, self.settings.kafka.max_event_bytes)
            except PermanentError as e:
                span.set_attribute("stream_guard.error_code", str(e.code))
                return dead_letter(record, e, headers=headers)
            span.set_attribute("stream_guard.upload_id", upload.upload_id)
            item = _Item(
                record, upload, self.registry.for_tenant(upload.tenant_id), trace_headers=headers
            )
            ocr = item.head.policy.ocr
            try:
                loaded = await asyncio.gather(*(self._load_image(r, ocr) for r in upload.images))
                item.images = [d[0] for d in loaded] if ocr else list(loaded)
                item.ocr_images = [d[1] for d in loaded] if ocr else []
            except PermanentError as e:
                span.set_attribute("stream_guard.error_code", str(e.code))
                return dead_letter(record, e, upload.upload_id, headers=headers)
            return item

    async def process(self, records: Sequence[Record]) -> list[Result]:
        prepared = await asyncio.gather(*(self._prepare(r) for r in records))
        items = [p for p in prepared if isinstance(p, _Item)]
        if items:
            scored = await self._score(items)
        results: list[Result] = []
        with tracer().start_as_current_span("policy decide"):
            for p in prepared:
                results.append(p if isinstance(p, Result) else self._decide(p, scored[id(p)]))
        return results

    async def _score(self, items: list[_Item]) -> dict[int, np.ndarray]:
        """Scores per item: every text segment (windows, normalised forms, image text) is a row
        of the head; the first row of an item carries its image signals; each category keeps
        its maximum over the item's rows."""
        all_images = [img for i in items for img in i.images]
        budget = self.settings.text.max_segments

        async def embed():
            await self._read_image_text(items)  # detect() runs meanwhile
            for i in items:
                segs = segments(i.upload.text, budget)
                i.truncated = segs.truncated
                i.texts = segs.texts + (windows(i.ocr_text) if i.ocr_text else [])
            texts = [t for i in items for t in i.texts]
            with tracer().start_as_current_span("triton infer text_encoder", kind=SpanKind.CLIENT):
                return await self.models.embed_texts(texts)

        async def detect():
            with tracer().start_as_current_span(
                "triton infer image_detector", kind=SpanKind.CLIENT
            ):
                return await self.models.detect(
                    np.stack(all_images) if all_images else np.zeros((0,))
                )

        embeddings, signals = await asyncio.gather(embed(), detect())
        start = 0
        for i in items:
            n = len(i.images)
            # An upload is as unsafe as its worst image: the element-wise max over its images.
            i.signals = (
                signals[start : start + n].max(axis=0) if n else np.zeros(N_SIGNALS, np.float32)
            )
            start += n
        start = 0
        for i in items:
            i.embeddings = embeddings[start : start + len(i.texts)]
            start += len(i.texts)
        groups: dict[tuple[str, int], list[_Item]] = {}
        for i in items:
            groups.setdefault((i.head.model_name, i.head.version), []).append(i)
        scores: dict[int, np.ndarray] = {}
        for (model, version), group in groups.items():
            rows_emb, rows_sig, owner = _head_rows(group)
            with tracer().start_as_current_span(f"triton infer {model}", kind=SpanKind.CLIENT):
                out = await self.models.score(model, version, rows_emb, rows_sig)
            for n, i in enumerate(group):
                scores[id(i)] = out[owner == n].max(axis=0)
        return scores

    async def _read_image_text(self, items: list[_Item]) -> None:
        """OCR through Triton for the uploads whose policy has `ocr: true` (only they carry
        ``ocr_images``); sets each one's ``ocr_text``."""
        wanted = [i for i in items if i.ocr_images]
        if not wanted:
            return
        from stream_guard.triton import image_text, read_text

        with tracer().start_as_current_span("triton infer ocr", kind=SpanKind.CLIENT):
            lines = await read_text(
                self.models.client,
                [g for i in wanted for g in i.ocr_images],
                timeout_s=self.settings.triton.timeout_s,
            )
        start = 0
        for i in wanted:
            i.ocr_text = image_text(lines[start : start + len(i.ocr_images)])
            start += len(i.ocr_images)

    def _decide(self, item: _Item, scores: np.ndarray) -> Result:
        signals = item.signals if item.signals is not None else np.zeros(N_SIGNALS, np.float32)
        return decide(
            item.record,
            item.upload,
            item.head.policy,
            (item.head.model_name, str(item.head.version)),
            scores,
            signals=signals,
            signal_names=IMAGE_SIGNALS,
            ocr_text=item.ocr_text,
            headers=item.trace_headers,
            truncated=item.truncated,
        )

    async def judge(self, upload: UploadEvent, images: list[np.ndarray]) -> Result:
        """Score one upload whose images are already decoded (the `moderate` CLI path)."""
        record = Record(upload.upload_id.encode(), upload.to_bytes(), "<local>", 0, 0)
        item = _Item(record, upload, self.registry.for_tenant(upload.tenant_id), images)
        scores = await self._score([item])
        return self._decide(item, scores[id(item)])

    def decode_local(self, data: bytes, content_type: str | None = None) -> np.ndarray:
        return self._decode(data, content_type)

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
