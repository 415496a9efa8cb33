"""The reasoning worker: a Faust agent on ``guard.escalations``.

Each escalated upload is put to a vision-language guard model (any OpenAI-compatible server)
and gets its final Verdict (mode ``reasoning``) on ``guard.verdicts``, or goes to
``guard.review`` when the model cannot decide, stays out of schema after retries, or disagrees
in advisory mode. A model server that is down (or a breaker that is open) is a transient
failure: the batch waits and retries with backoff (backpressure), it is not sent to people as
if the model had disagreed. Same delivery rules as the fast worker: acks in offset order, only
after the outputs are acknowledged by the broker; an unforeseen error is a dead letter.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

import faust
from opentelemetry.trace import SpanKind
from prometheus_client import Counter
from pydantic import ValidationError

from stream_guard import observability as obs
from stream_guard.errors import (
    DependencyUnavailable,
    ErrorCode,
    EventError,
    MediaError,
    ReasoningError,
)
from stream_guard.events import Escalation
from stream_guard.kafka import Health, InOrderAcks, Publisher, create_app, record_of
from stream_guard.media.storage import ObjectStore
from stream_guard.pipeline.decide import dead_letter, unexpected
from stream_guard.pipeline.records import Output, Record, trace_headers
from stream_guard.policy.live import load_configured
from stream_guard.policy.model import Policy
from stream_guard.reasoning.cascade import final_verdict
from stream_guard.reasoning.client import ReasoningClient
from stream_guard.retry import backoff_delays
from stream_guard.settings import Settings

__all__ = ["ReasoningWorker", "create_reasoning_worker"]

log = logging.getLogger(__name__)

REASONING = Counter("stream_guard_reasoning_total", "Reasoning-tier outcomes", ["outcome"])
# Policies kept per id after reloads, so a redelivered escalation is judged by the version that
# made its fast verdict (the verdict id names that version).
KEPT_VERSIONS = 8
# Images sent inline to a vision model: base64 of this many bytes at most, in total.
MAX_INLINE_IMAGE_BYTES = 32 * 1024 * 1024


class ReasoningWorker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        t = settings.telemetry
        obs.setup_tracing(t.service_name + "-reasoning", t.otlp_endpoint, t.span_file)
        self.health = Health(settings.batch.stall_after_s, waiting=lambda: self._busy)
        self.health.ready = True  # ready even while the model server is down: it backs off
        self.app = create_app(settings.kafka, t, settings.kafka.reasoning_group, self.health)
        topics = settings.kafka.topics
        self.publisher = Publisher(
            self.app,
            {"verdicts": topics.verdicts, "review": topics.review, "dlq": topics.dlq},
            settings.retry,
            self.health,
        )
        self.escalations = self.app.topic(topics.escalations, value_type=bytes, key_type=bytes)
        self.client = ReasoningClient.from_settings(settings.reasoning)
        self.store = ObjectStore(settings.s3) if settings.reasoning.vision else None
        self.policies: dict[tuple[str, str], Policy] = {}
        self.latest: dict[str, Policy] = {}
        self._remember(load_configured(settings).values())
        self.server_up = False
        self._busy = False
        self._register()

    def _remember(self, policies: Any) -> None:
        for p in policies:
            self.policies[(p.policy_id, p.effective_version)] = p
            self.latest[p.policy_id] = p
        for policy_id in {pid for pid, _ in self.policies}:
            versions = [k for k in self.policies if k[0] == policy_id]
            for old in versions[:-KEPT_VERSIONS]:
                del self.policies[old]

    def policy_for(self, policy_id: str, version: str) -> Policy | None:
        return self.policies.get((policy_id, version)) or self.latest.get(policy_id)

    def _register(self) -> None:
        app, worker = self.app, self

        @app.agent(self.escalations, name="reasoning")
        async def reason(stream: faust.StreamT) -> None:
            limit = worker.settings.reasoning.max_concurrency
            acks = InOrderAcks(stream)
            async for events in stream.noack_take(limit * 2, within=0.2):
                events = list(events)
                acks.received(events)
                await worker.handle(events)
                await acks.finish(events)
                worker.health.progressed()

        @app.timer(interval=5.0)
        async def probe() -> None:
            try:
                await worker.client.ping()
                worker.server_up = True
                worker.health.failing.discard("reasoning")
            except DependencyUnavailable:
                worker.server_up = False
            obs.DEPENDENCY_UP.labels("reasoning").set(1 if worker.server_up else 0)

        @app.timer(interval=self.settings.policy.reload_interval_s)
        async def reload() -> None:
            loop = asyncio.get_running_loop()
            try:
                worker._remember(
                    (await loop.run_in_executor(None, load_configured, worker.settings)).values()
                )
            except Exception as e:
                log.error("policy reload failed, keeping the running policies: %s", e)

    async def handle(self, events: list[Any]) -> None:
        self._busy = True
        try:
            records = [record_of(e) for e in events]
            outputs = await self._decide_with_retry(records)
            await self.publisher.publish(outputs)
        finally:
            self._busy = False

    async def _decide_with_retry(self, records: list[Record]) -> list[Output]:
        for delay in backoff_delays(self.settings.retry, forever=True):
            try:
                return list(await asyncio.gather(*(self.decide(r) for r in records)))
            except DependencyUnavailable as e:  # model server or S3 down: wait, never review
                self.health.failing.add(e.dependency)
                obs.RETRIES.labels(e.dependency).inc()
                log.warning("reasoning batch waits: %s; retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def decide(self, record: Record) -> Output:
        try:
            return await self._decide(record)
        except DependencyUnavailable:
            raise
        except Exception as e:  # one bad record never crashes the agent
            return unexpected(record, e, "reasoning").outputs[0]

    async def _decide(self, record: Record) -> Output:
        with obs.tracer().start_as_current_span(
            f"{record.topic} process",
            context=obs.extract(record.headers),
            kind=SpanKind.CONSUMER,
        ):
            headers = obs.inject() or trace_headers(record)
            try:
                escalation = Escalation.model_validate_json(record.value)
            except (ValidationError, ValueError, RecursionError) as e:
                err = EventError(
                    ErrorCode.EVENT_MALFORMED,
                    f"not an Escalation: {str(e)[:500]}",
                    stage="reasoning",
                )
                return dead_letter(record, err, headers=headers).outputs[0]
            fast = escalation.fast_verdict
            policy = self.policy_for(fast.policy_id, fast.policy_version)
            if policy is None:
                err = EventError(
                    ErrorCode.POLICY_UNKNOWN_TENANT,
                    f"no policy {fast.policy_id!r} configured here",
                    stage="reasoning",
                )
                return dead_letter(record, err, escalation.upload.upload_id, headers).outputs[0]
            return await self._ask(escalation, policy, headers)

    async def _ask(self, escalation: Escalation, policy: Policy, headers: dict) -> Output:
        result, failure = None, None
        start = time.perf_counter()
        with obs.tracer().start_as_current_span("reasoning call", kind=SpanKind.CLIENT) as span:
            span.set_attribute("gen_ai.request.model", self.settings.reasoning.model)
            try:
                images = await self._image_parts(escalation)
                answer = await self.client.classify(policy, escalation, images)
                result = answer.result
            except (ReasoningError, MediaError) as e:
                failure = f"{type(e).__name__}: {e}"
                span.set_attribute("stream_guard.failure", failure[:200])
        obs.STAGE_SECONDS.labels("reasoning").observe(time.perf_counter() - start)
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
        obs.EVENTS.labels(outcome).inc()
        role = "review" if to_review else "verdicts"
        return Output(role, escalation.upload.upload_id.encode(), verdict.to_bytes(), headers)

    async def _image_parts(self, escalation: Escalation) -> list[str]:
        if not self.settings.reasoning.vision or self.store is None:
            return []
        parts, total = [], 0
        loop = asyncio.get_running_loop()
        for ref in escalation.upload.images:
            obj = await self.store.fetch(ref)
            total += len(obj.data)
            if total > MAX_INLINE_IMAGE_BYTES:
                break  # the rest is described by the fast-mode evidence in words
            mime = obj.content_type or "image/jpeg"
            encoded = await loop.run_in_executor(None, base64.b64encode, obj.data)
            parts.append(f"data:{mime};base64,{encoded.decode()}")
        return parts


def create_reasoning_worker(settings: Settings | None = None) -> ReasoningWorker:
    return ReasoningWorker(settings or Settings())
