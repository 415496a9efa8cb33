"""The fast-mode stage: a batch of Kafka records in, the records to publish out.

No Kafka here: the agent hands in records and publishes what comes back, so this logic is
testable on its own. Per record the outcome is a final verdict, a provisional verdict plus an
escalation, or a dead letter. Permanent errors (bad event, missing object, hostile image) end
that one record in the DLQ; transient errors (S3 or Triton down) raise, and the agent retries
the whole batch later without acking anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from .errors import ErrorCode, EventError, PermanentError
from .events import (
    DeadLetter,
    Decision,
    Escalation,
    Evidence,
    Mode,
    SourceRef,
    UploadEvent,
    Verdict,
)
from .inference import EMBED_DIM, N_SIGNALS, GuardModels
from .policies_runtime import ActiveHead, PolicyRegistry
from .policy import IMAGE_SIGNALS
from .settings import Settings
from .storage import ObjectStore
from .tracing import extract, inject, tracer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One consumed Kafka record, as the pipeline sees it."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int
    headers: dict[str, bytes] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True)
class Output:
    role: str  # "verdicts" | "escalations" | "dlq" | "review"
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


@dataclass
class Result:
    record: Record
    outcome: str  # allow | block | escalate | dlq
    outputs: list[Output]
    upload_id: str | None = None
    error_code: str | None = None


def dead_letter(
    record: Record,
    error: PermanentError,
    upload_id: str | None = None,
    headers: dict[str, bytes] | None = None,
) -> Result:
    letter = DeadLetter(
        upload_id=upload_id,
        error_code=str(error.code),
        reason=error.reason,
        stage=error.stage,
        source=SourceRef(topic=record.topic, partition=record.partition, offset=record.offset),
        original_key_b64=DeadLetter.encode(record.key),
        original_value_b64=DeadLetter.encode(record.value) or "",
    )
    log.warning(
        "dead-lettered %s: %s",
        record.where,
        error,
        extra={"where": record.where, "upload_id": upload_id, "error_code": str(error.code)},
    )
    out = Output("dlq", record.key, letter.to_bytes(), headers or _trace_headers(record))
    return Result(record, "dlq", [out], upload_id, str(error.code))


def _trace_headers(record: Record) -> dict[str, bytes]:
    return {k: v for k, v in record.headers.items() if k in ("traceparent", "tracestate")}


def parse_upload(record: Record, max_bytes: int) -> UploadEvent:
    if len(record.value) > max_bytes:
        raise EventError(
            ErrorCode.EVENT_TOO_LARGE,
            f"event is {len(record.value)} bytes, over the {max_bytes}-byte limit",
            stage="parse",
        )
    try:
        data = json.loads(record.value)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EventError(ErrorCode.EVENT_MALFORMED, f"not JSON: {e}", stage="parse") from e
    if isinstance(data, dict) and isinstance(data.get("schema_version"), int):
        if data["schema_version"] > 1:
            raise EventError(
                ErrorCode.EVENT_UNSUPPORTED_SCHEMA,
                f"schema_version {data['schema_version']} is newer than this worker reads (1)",
                stage="parse",
            )
    try:
        return UploadEvent.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in e.errors()[:5]
        )
        raise EventError(ErrorCode.EVENT_MALFORMED, problems, stage="parse") from e


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
        from .media import ImageLimits, decode_image, preprocess_for_detector

        m = self.settings.media
        limits = ImageLimits(
            max_bytes=self.settings.s3.max_object_bytes,
            max_pixels=m.max_pixels,
            max_side=m.max_side,
            max_frames=m.max_frames,
        )
        image = decode_image(data, content_type=content_type, limits=limits)
        prepared = preprocess_for_detector(image.rgb)
        prepared = (
            prepared[0] if isinstance(prepared, tuple) else getattr(prepared, "image", prepared)
        )
        if ocr:  # the OCR model reads the image near its own resolution, not the 320px thumbnail
            from .ocr import prepare_for_ocr

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
        with_text = [i for i in items if i.upload.text.joined()]
        all_images = [img for i in items for img in i.images]
        ocr_items: list[_Item] = []

        async def embed():
            await self._read_image_text(items)  # detect() runs meanwhile
            ocr_items.extend(i for i in items if i.ocr_text)
            texts = [i.upload.text.joined() for i in with_text] + [i.ocr_text for i in ocr_items]
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
        emb_by_item = {id(i): embeddings[n] for n, i in enumerate(with_text)}
        ocr_emb = {id(i): embeddings[len(with_text) + n] for n, i in enumerate(ocr_items)}
        per_item_signals: dict[int, np.ndarray] = {}
        start = 0
        for i in items:
            n = len(i.images)
            # An upload is as unsafe as its worst image: the element-wise max over its images.
            per_item_signals[id(i)] = (
                signals[start : start + n].max(axis=0) if n else np.zeros(N_SIGNALS, np.float32)
            )
            start += n
        groups: dict[tuple[str, int], list[_Item]] = {}
        for i in items:
            groups.setdefault((i.head.model_name, i.head.version), []).append(i)
        scores: dict[int, np.ndarray] = {}
        for (model, version), group in groups.items():
            emb = np.stack([emb_by_item.get(id(i), np.zeros(EMBED_DIM, np.float32)) for i in group])
            sig = np.stack([per_item_signals[id(i)] for i in group])
            # Text read in images is scored as its own row (no image signals), see ocr.py.
            read = [i for i in group if id(i) in ocr_emb]
            rows_emb = np.concatenate([emb, *[ocr_emb[id(i)][None] for i in read]])
            rows_sig = np.concatenate([sig, np.zeros((len(read), N_SIGNALS), np.float32)])
            with tracer().start_as_current_span(f"triton infer {model}", kind=SpanKind.CLIENT):
                out = await self.models.score(model, version, rows_emb, rows_sig)
            for n, i in enumerate(group):
                scores[id(i)] = out[n]
                i.signals = sig[n]
            for n, i in enumerate(read):  # each category keeps the higher of caption and image text
                scores[id(i)] = np.maximum(scores[id(i)], out[len(group) + n])
        return scores

    async def _read_image_text(self, items: list[_Item]) -> None:
        """OCR through Triton for the uploads whose policy has `ocr: true` (only they carry
        ``ocr_images``); sets each one's ``ocr_text``."""
        wanted = [i for i in items if i.ocr_images]
        if not wanted:
            return
        from .ocr import image_text, read_text

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
        policy = item.head.policy
        upload = item.upload
        decision, categories = policy.decide(dict(zip(policy.codes, scores.tolist(), strict=True)))
        flagged = [c.code for c in categories if c.decision != Decision.ALLOW]
        final = decision != Decision.ESCALATE
        verdict = Verdict(
            verdict_id=Verdict.make_id(
                upload.upload_id, policy.effective_version, Mode.FAST, final
            ),
            upload_id=upload.upload_id,
            tenant_id=upload.tenant_id,
            decision=decision,
            final=final,
            mode=Mode.FAST,
            flagged=flagged,
            categories=categories,
            policy_id=policy.policy_id,
            policy_version=policy.effective_version,
            model_name=item.head.model_name,
            model_version=str(item.head.version),
        )
        headers = item.trace_headers or _trace_headers(item.record)
        key = upload.upload_id.encode()
        outputs = [Output("verdicts", key, verdict.to_bytes(), headers)]
        if decision == Decision.ESCALATE:
            signals = item.signals if item.signals is not None else np.zeros(N_SIGNALS)
            detections = [
                {name: round(float(s), 4)}
                for name, s in zip(IMAGE_SIGNALS, signals, strict=True)
                if s >= 0.2
            ]
            top = sorted(categories, key=lambda c: c.score, reverse=True)[:5]
            escalation = Escalation(
                upload=upload,
                fast_verdict=verdict,
                evidence=Evidence(
                    image_detections=detections, top_categories=top, ocr_text=item.ocr_text[:2000]
                ),
            )
            outputs.append(Output("escalations", key, escalation.to_bytes(), headers))
        return Result(item.record, str(decision), outputs, upload.upload_id)

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
