"""The reasoning worker: a Faust agent on ``guard.escalations``.

Each escalated upload is put to a vision-language guard model (any OpenAI-compatible server)
and gets its final Verdict (mode ``reasoning``) on ``guard.verdicts``, or goes to
``guard.review`` when the model cannot decide, stays out of schema after retries, disagrees in
advisory mode, or stays unavailable. Same delivery rules as the fast worker: ack only after the
output is acknowledged by the broker.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

import faust
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, generate_latest
from pydantic import ValidationError

from . import telemetry as tm
from . import tracing
from .errors import DependencyUnavailable, ErrorCode, EventError, MediaError, ReasoningError
from .events import Escalation
from .pipeline import Output, Record, _trace_headers, dead_letter
from .policy import Policy, load_policy
from .reasoning.cascade import final_verdict
from .reasoning.client import ReasoningClient
from .retry import backoff_delays
from .settings import Settings
from .storage import ObjectStore
from .telemetry import PROM_CONTENT_TYPE
from .worker import _headers, faust_broker_options

log = logging.getLogger(__name__)

REASONING = Counter("stream_guard_reasoning_total", "Reasoning-tier outcomes", ["outcome"])


class ReasoningWorker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        t = settings.telemetry
        tracing.setup_tracing(t.service_name + "-reasoning", t.otlp_endpoint, t.span_file)
        opts = faust_broker_options(settings.kafka, settings.kafka.reasoning_group)
        # No unbounded wait for unacked escalations on SIGTERM: a call cut short leaves its
        # escalation unacked, and the next owner of the partition asks again.
        self.app = faust.App(
            **opts,
            stream_wait_empty=False,
            web_enabled=True,
            web_bind=t.http_host,
            web_port=t.metrics_port,
        )
        topics = settings.kafka.topics
        self.topics = {"verdicts": topics.verdicts, "review": topics.review, "dlq": topics.dlq}
        self.escalations = self.app.topic(topics.escalations, value_type=bytes, key_type=bytes)
        self.client = ReasoningClient.from_settings(settings.reasoning)
        self.store = ObjectStore(settings.s3) if settings.reasoning.vision else None
        self.policies = self._load_policies()
        self.server_up = False
        self._register()

    def _load_policies(self) -> dict[str, Policy]:
        paths = [self.settings.policy.path, *self.settings.policy.tenants.values()]
        return {p.policy_id: p for p in (load_policy(path) for path in paths)}

    def _register(self) -> None:
        app, worker = self.app, self

        @app.agent(self.escalations, name="reasoning")
        async def reason(stream: faust.StreamT) -> None:
            limit = worker.settings.reasoning.max_concurrency
            async for events in stream.noack_take(limit * 2, within=0.2):
                await worker.handle(stream, list(events))

        @app.timer(interval=5.0)
        async def probe() -> None:
            try:
                await worker.client.ping()
                worker.server_up = True
            except DependencyUnavailable:
                worker.server_up = False
            tm.DEPENDENCY_UP.labels("reasoning").set(1 if worker.server_up else 0)

        @app.timer(interval=self.settings.policy.reload_interval_s)
        async def reload() -> None:
            try:
                worker.policies = worker._load_policies()
            except Exception as e:
                log.error("policy reload failed, keeping the running policies: %s", e)

        @app.page("/healthz")
        async def healthz(web, request):  # type: ignore[no-untyped-def]
            return web.json({"status": "alive"})

        @app.page("/readyz")
        async def readyz(web, request):  # type: ignore[no-untyped-def]
            # Ready even when the model server is down: escalations then go to review.
            return web.json({"ready": True, "reasoning_server_up": worker.server_up})

        @app.page("/metrics")
        async def metrics(web, request):  # type: ignore[no-untyped-def]
            return web.bytes(generate_latest(), content_type=PROM_CONTENT_TYPE)

    async def handle(self, stream: faust.StreamT, events: list[Any]) -> None:
        records = [
            Record(
                e.message.key,
                e.message.value or b"",
                e.message.topic,
                e.message.partition,
                e.message.offset,
                _headers(e.message.headers),
            )
            for e in events
        ]
        outputs = await asyncio.gather(*(self.decide(r) for r in records))
        for delay in backoff_delays(self.settings.retry, forever=True):
            try:
                futures = [
                    await self.app.producer.send(
                        self.topics[o.role],
                        o.key,
                        o.value,
                        partition=None,
                        timestamp=None,
                        headers=list(o.headers.items()),
                    )
                    for o in outputs
                ]
                await asyncio.gather(*futures)
                break
            except Exception as e:
                tm.RETRIES.labels("kafka").inc()
                log.warning("publishing reasoning verdicts failed: %r; retrying", e)
                await asyncio.sleep(delay)
        for event in events:
            await stream.ack(event)

    async def decide(self, record: Record) -> Output:
        with tracing.tracer().start_as_current_span(
            f"{record.topic} process",
            context=tracing.extract(record.headers),
            kind=SpanKind.CONSUMER,
        ):
            headers = tracing.inject() or _trace_headers(record)
            try:
                escalation = Escalation.model_validate_json(record.value)
            except ValidationError as e:
                err = EventError(
                    ErrorCode.EVENT_MALFORMED,
                    f"not an Escalation: {e.errors()[:3]}",
                    stage="reasoning",
                )
                return dead_letter(record, err, headers=headers).outputs[0]
            policy = self.policies.get(escalation.fast_verdict.policy_id)
            if policy is None:
                err = EventError(
                    ErrorCode.POLICY_UNKNOWN_TENANT,
                    f"no policy {escalation.fast_verdict.policy_id!r} configured here",
                    stage="reasoning",
                )
                return dead_letter(record, err, escalation.upload.upload_id, headers).outputs[0]
            result, failure = None, None
            start = time.perf_counter()
            with tracing.tracer().start_as_current_span(
                "reasoning call", kind=SpanKind.CLIENT
            ) as span:
                span.set_attribute("gen_ai.request.model", self.settings.reasoning.model)
                try:
                    images = await self._image_parts(escalation)
                    answer = await self.client.classify(policy, escalation, images)
                    result = answer.result
                except (DependencyUnavailable, ReasoningError, MediaError) as e:
                    failure = f"{type(e).__name__}: {e}"
                    span.set_attribute("stream_guard.failure", failure[:200])
            tm.STAGE_SECONDS.labels("reasoning").observe(time.perf_counter() - start)
            verdict, to_review = final_verdict(
                escalation,
                result,
                policy=policy,
                trust=self.settings.reasoning.trust,
                model_name=self.settings.reasoning.model,
                prompt_format=self.settings.reasoning.prompt_format,
                failure_reason=failure,
            )
            outcome = "review" if to_review else str(verdict.decision)
            REASONING.labels(outcome).inc()
            tm.EVENTS.labels(outcome).inc()
            role = "review" if to_review else "verdicts"
            return Output(role, escalation.upload.upload_id.encode(), verdict.to_bytes(), headers)

    async def _image_parts(self, escalation: Escalation) -> list[str]:
        if not self.settings.reasoning.vision or self.store is None:
            return []
        parts = []
        for ref in escalation.upload.images:
            obj = await self.store.fetch(ref)
            mime = obj.content_type or "image/jpeg"
            parts.append(f"data:{mime};base64,{base64.b64encode(obj.data).decode()}")
        return parts


def create_reasoning_worker(settings: Settings | None = None) -> ReasoningWorker:
    return ReasoningWorker(settings or Settings())
