"""The fast-mode stage: a batch of Kafka records in, the records to publish out.

No Kafka here: the agent hands in records and publishes what comes back, so this logic is
testable on its own. Per record the outcome is a final verdict, a provisional verdict plus an
escalation, or a dead letter. Permanent errors (bad event, missing object, hostile image) end
that one record in the DLQ. A transient error of one record's own image fetch (its bucket
missing, the store unreachable) comes back as ``Deferred`` for that record alone; a transient
error of the batch (Triton down) raises, and the agent retries the whole batch later without
acking anything.

Each image is decoded once and prepared for every model that reads it: the detector's 320 px
square, the OCR model's capped size (``ocr: true`` policies), and the exported image tower's
input (policies with an image head: the tower's size and resize rule, read from Triton). The
decode itself stops at the resolution the largest of those needs (a JPEG is decoded at 1/2, 1/4
or 1/8 scale when that still covers it: ``media.decode.NeededSize``). With
an image head, an upload's image evidence is its worst image under the policy's image head
(image and caption embeddings from the dual encoder), and each category's score is the higher
of the text head's and the image head's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import SpanKind

from stream_guard.errors import PermanentError, TransientError
from stream_guard.events import UploadEvent
from stream_guard.media.decode import DETECTOR_SIZE, ImageLimits, NeededSize, TowerInput
from stream_guard.media.storage import ByteBudget, ObjectStore
from stream_guard.observability import cpu_stage, extract, inject, span, tracer
from stream_guard.pipeline.decide import dead_letter, decide, parse_upload, unexpected
from stream_guard.pipeline.records import Deferred, Record, Result
from stream_guard.policy.model import IMAGE_SIGNALS
from stream_guard.policy.registry import ActiveHead, PolicyRegistry
from stream_guard.settings import Settings
from stream_guard.text import image_text_segments, segments
from stream_guard.triton import MAX_SIDE, N_SIGNALS, GuardModels

__all__ = [
    "Moderator",
    "PreparedImage",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedImage:
    """One decoded image as each model wants it (``None``: that model does not read it)."""

    detector: np.ndarray
    tower: np.ndarray | None = None
    ocr: np.ndarray | None = None


@dataclass
class _Item:
    record: Record
    upload: UploadEvent
    head: ActiveHead
    images: list[np.ndarray] = field(default_factory=list)
    tower_images: list[np.ndarray] = field(default_factory=list)  # policies with an image head
    image_scores: np.ndarray | None = None  # the image head's scores (max over the images)
    trace_headers: dict[str, bytes] = field(default_factory=dict)
    signals: np.ndarray | None = None
    ocr_images: list[np.ndarray] = field(default_factory=list)  # only for `ocr: true` policies
    ocr_text: str = ""
    texts: list[str] = field(default_factory=list)  # what the text tower scores (see text.py)
    embeddings: np.ndarray | None = None
    truncated: bool = False


def _take_images(item: _Item, loaded: Sequence[PreparedImage]) -> None:
    item.images = [d.detector for d in loaded]
    item.tower_images = [d.tower for d in loaded if d.tower is not None]
    item.ocr_images = [d.ocr for d in loaded if d.ocr is not None]


async def _none() -> None:
    return None


# The worker sends the OCR model at most MAX_SIDE px on the longest side: a larger JPEG may be
# decoded at a reduced scale, down to that.
OCR_SIZE = NeededSize(longest=MAX_SIDE)


def _needed(ocr: bool, tower: TowerInput | None) -> NeededSize:
    """The resolution one decode must keep for every model that reads the image."""
    needed = DETECTOR_SIZE
    if tower is not None:
        needed |= tower.needed()
    if ocr:
        needed |= OCR_SIZE
    return needed


def _head_rows(group: list[_Item], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The head's input rows for a group: one row per text segment (zero embedding for an item
    without text), image signals on each item's first row only; ``owner`` maps rows to items."""
    embs, sigs, owner = [], [], []
    for n, i in enumerate(group):
        item_embs = i.embeddings if i.embeddings is not None and len(i.embeddings) else None
        if item_embs is None:
            item_embs = np.zeros((1, width), np.float32)
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
        self._buffered = ByteBudget(settings.media.max_buffered_bytes)
        m = settings.media
        self._limits = ImageLimits(
            max_bytes=settings.s3.max_object_bytes,
            max_pixels=m.max_pixels,
            max_side=m.max_side,
            max_frames=m.max_frames,
        )

    async def _load_image(self, ref, ocr: bool = False, tower=None) -> PreparedImage:
        # Fetched bytes wait for the decode pool; the budget bounds them in bytes, not count.
        async with self._buffered.reserve(self.settings.s3.max_object_bytes):
            with span("s3 get", kind=SpanKind.CLIENT) as get_span:
                get_span.set_attribute("s3.uri", ref.uri)
                obj = await self.store.fetch(ref)
            loop = asyncio.get_running_loop()
            with span("image decode"):
                return await loop.run_in_executor(
                    self._decode_pool,
                    self._decode,
                    obj.data,
                    ref.content_type or obj.content_type,
                    ocr,
                    tower,
                )

    def _decode(
        self, data: bytes, content_type: str | None, ocr: bool = False, tower=None
    ) -> PreparedImage:
        from stream_guard.media.decode import (
            decode_image,
            preprocess_for_detector,
            preprocess_for_tower,
        )

        with cpu_stage("decode"):
            image = decode_image(
                data,
                content_type=content_type,
                limits=self._limits,
                needed=_needed(ocr, tower),
            )
        with cpu_stage("preprocess"):
            detector = preprocess_for_detector(image.rgb).image
            sized = preprocess_for_tower(image.rgb, tower) if tower is not None else None
            read = None
            if ocr:  # the OCR model reads the image near its own resolution, not 320 px
                from stream_guard.triton import prepare_for_ocr

                read = prepare_for_ocr(image.rgb)
        return PreparedImage(detector, sized, read)

    async def _prepare(self, record: Record) -> _Item | Result:
        # One span per upload, child of the producer's context: one trace per upload.
        with tracer().start_as_current_span(  # always: it carries the upload's trace context
            f"{record.topic} process",
            context=extract(record.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset,
            },
        ) as upload_span:
            with cpu_stage("parse"):
                headers = inject()
                try:
                    upload = parse_upload(record, self.settings.kafka.max_event_bytes)
                except PermanentError as e:
                    upload_span.set_attribute("stream_guard.error_code", str(e.code))
                    return dead_letter(record, e, headers=headers)
                upload_span.set_attribute("stream_guard.upload_id", upload.upload_id)
                head = self.registry.for_tenant(upload.tenant_id)
                item = _Item(record, upload, head, trace_headers=headers)
                ocr = head.policy.ocr
                tower = head.image.guard.tower_input() if head.image else None
            try:
                if len(upload.images) == 1:  # the common case: no task and gather per upload
                    loaded = [await self._load_image(upload.images[0], ocr, tower)]
                else:
                    loaded = await asyncio.gather(
                        *(self._load_image(r, ocr, tower) for r in upload.images)
                    )
                _take_images(item, loaded)
            except PermanentError as e:
                upload_span.set_attribute("stream_guard.error_code", str(e.code))
                return dead_letter(record, e, upload.upload_id, headers=headers)
            return item

    async def process(self, records: Sequence[Record]) -> list[Result | Deferred]:
        """One Result per record, or Deferred for a record whose own image could not be fetched
        because the object store (or its bucket) is down: the agent finishes the rest and tries
        that one again. Transient errors of the whole batch (Triton) raise; any other error
        stays with its record as a dead letter."""
        prepared = await asyncio.gather(*(self._prepare_one(r) for r in records))
        items = [p for p in prepared if isinstance(p, _Item)]
        scored, failed = await self._score_isolating(items) if items else ({}, {})
        results: list[Result | Deferred] = []
        with span("policy decide"), cpu_stage("serialise"):
            for p in prepared:
                if isinstance(p, Result | Deferred):
                    results.append(p)
                elif id(p) in failed:
                    results.append(failed[id(p)])
                else:
                    results.append(self._decide_one(p, scored[id(p)]))
        return results

    async def _prepare_one(self, record: Record) -> _Item | Result | Deferred:
        try:
            return await self._prepare(record)
        except TransientError as e:
            return Deferred(record, e)
        except Exception as e:
            return unexpected(record, e, "prepare")

    def _decide_one(self, item: _Item, scores: np.ndarray) -> Result:
        try:
            return self._decide(item, scores)
        except Exception as e:
            return unexpected(item.record, e, "decide")

    async def _score_isolating(
        self, items: list[_Item]
    ) -> tuple[dict[int, np.ndarray], dict[int, Result]]:
        """Score the batch at once; if Triton refuses it (or anything unforeseen happens), score
        each upload alone so only the one it is about is dead-lettered."""
        try:
            return await self._score(items), {}
        except TransientError:
            raise
        except Exception as e:
            if len(items) == 1:
                return {}, {id(items[0]): self._failure(items[0], e)}
        scored: dict[int, np.ndarray] = {}
        failed: dict[int, Result] = {}
        for item in items:
            try:
                scored.update(await self._score([item]))
            except TransientError:
                raise
            except Exception as e:
                failed[id(item)] = self._failure(item, e)
        return scored, failed

    @staticmethod
    def _failure(item: _Item, e: Exception) -> Result:
        if isinstance(e, PermanentError):
            return dead_letter(item.record, e, item.upload.upload_id, item.trace_headers)
        return unexpected(item.record, e, "score")

    async def _score(self, items: list[_Item]) -> dict[int, np.ndarray]:
        """Scores per item: every text segment (windows, normalised forms, image text) is a row
        of the head; the first row of an item carries its image signals; each category keeps
        its maximum over the item's rows."""
        budget = self.settings.text.max_segments

        async def embed():
            await self._read_image_text(items)  # detect() runs meanwhile
            with cpu_stage("preprocess"):  # the text tower's windows and normalised forms
                for i in items:
                    segs = segments(i.upload.text, budget)
                    i.truncated = segs.truncated
                    i.texts = segs.texts + (image_text_segments(i.ocr_text) if i.ocr_text else [])
                texts = [t for i in items for t in i.texts]
            with span("triton infer text_encoder", kind=SpanKind.CLIENT):
                return await self.models.embed_texts(texts)

        async def detect():
            with cpu_stage("score"):
                all_images = [img for i in items for img in i.images]
                batch = np.stack(all_images) if all_images else np.zeros((0,))
            with span("triton infer image_detector", kind=SpanKind.CLIENT):
                return await self.models.detect(batch)

        embeddings, signals, _ = await asyncio.gather(embed(), detect(), self._judge_images(items))
        with cpu_stage("score"):
            self._spread(items, embeddings, signals)
        scores = await self._text_scores(items)
        with cpu_stage("score"):
            for i in items:  # a category is as unsafe as its worst evidence, text or image
                if i.image_scores is not None:
                    scores[id(i)] = np.maximum(scores[id(i)], i.image_scores)
        return scores

    @staticmethod
    def _spread(items: list[_Item], embeddings: np.ndarray, signals: np.ndarray) -> None:
        """Each item's share of the batch's detector signals and text embeddings."""
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

    async def _text_scores(self, items: list[_Item]) -> dict[int, np.ndarray]:
        """The policies' heads over the items' text rows (and detector signals)."""
        groups: dict[tuple[str, int], list[_Item]] = {}
        for i in items:
            groups.setdefault((i.head.model_name, i.head.version), []).append(i)
        scores: dict[int, np.ndarray] = {}
        for (model, version), group in groups.items():
            with cpu_stage("score"):
                rows_emb, rows_sig, owner = _head_rows(group, self.models.embed_width)
            with span(f"triton infer {model}", kind=SpanKind.CLIENT):
                out = await self.models.score(model, version, rows_emb, rows_sig)
            with cpu_stage("score"):
                for n, i in enumerate(group):
                    scores[id(i)] = out[owner == n].max(axis=0)
        return scores

    async def _judge_images(self, items: list[_Item]) -> None:
        """The image heads: each image of an upload is a row, with the upload's text embedded by
        the same dual encoder as its caption (zeros without text); sets ``image_scores``."""
        wanted = [i for i in items if i.head.image is not None and i.tower_images]
        if not wanted:
            return
        texts = [i.upload.text.joined() for i in wanted]
        captioned = [t for t in texts if t]
        with span("triton infer image_tower", kind=SpanKind.CLIENT):
            image_emb, caption_emb = await asyncio.gather(
                self.models.embed_images(np.stack([g for i in wanted for g in i.tower_images])),
                self.models.embed_image_texts(captioned) if captioned else _none(),
            )
        dim = image_emb.shape[1]
        by_text = iter(caption_emb if caption_emb is not None else [])
        caps = [next(by_text) if t else np.zeros(dim, np.float32) for t in texts]
        groups: dict[tuple[str, int], list[int]] = {}
        for n, i in enumerate(wanted):
            assert i.head.image is not None
            groups.setdefault((i.head.image.model_name, i.head.image.version), []).append(n)
        starts = np.cumsum([0] + [len(i.tower_images) for i in wanted])
        for (model, version), members in groups.items():
            rows = [r for n in members for r in range(starts[n], starts[n + 1])]
            owner = np.repeat(members, [len(wanted[n].tower_images) for n in members])
            cap_rows = np.stack([caps[n] for n in owner])
            with span(f"triton infer {model}", kind=SpanKind.CLIENT):
                out = await self.models.image_scores(model, version, image_emb[rows], cap_rows)
            for n in members:
                wanted[n].image_scores = out[owner == n].max(axis=0)

    async def _read_image_text(self, items: list[_Item]) -> None:
        """OCR through Triton for the uploads whose policy has `ocr: true` (only they carry
        ``ocr_images``); sets each one's ``ocr_text``."""
        wanted = [i for i in items if i.ocr_images]
        if not wanted:
            return
        from stream_guard.triton import image_text, read_text

        with span("triton infer ocr", kind=SpanKind.CLIENT):
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
        image = item.head.image
        image_models = image.models() if image and item.image_scores is not None else None
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
            image_models=image_models,
        )

    async def judge(
        self, upload: UploadEvent, images: Sequence[np.ndarray | PreparedImage]
    ) -> Result:
        """Score one upload whose images are already decoded (the `moderate` CLI and `eval`
        path): ``decode_local``'s output, or bare detector inputs."""
        record = Record(upload.upload_id.encode(), upload.to_bytes(), "<local>", 0, 0)
        item = _Item(record, upload, self.registry.for_tenant(upload.tenant_id))
        prepared = [i if isinstance(i, PreparedImage) else PreparedImage(i) for i in images]
        _take_images(item, prepared)
        if item.head.image is None:
            item.tower_images = []
        scores = await self._score([item])
        return self._decide(item, scores[id(item)])

    def decode_local(self, data: bytes, content_type: str | None = None) -> PreparedImage:
        """Decode and prepare one image for ``judge`` (the image tower's input too, when an
        image guard is served)."""
        guard = self.models.known_image_guard
        return self._decode(data, content_type, False, guard.tower_input() if guard else None)

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
