"""The review worker: reviewer decisions become final verdicts and labelled data.

A Faust agent on ``guard.review.decisions``. For each ReviewDecision it

1. adds the upload's labelled row to the manifest store (``review.manifest``, when set): the
   first decision for an upload is its label; a later, different decision for the same upload is
   a conflict, counted and logged, and makes no second verdict;
2. publishes the final verdict (mode ``human``) to ``guard.verdicts``, keyed by upload id: a
   function of the decision alone, so a redelivered decision republishes identical bytes and
   downstream services need no subscription of their own to the decisions;
3. counts the live and the shadow policy against the reviewer's label, when the candidate
   scored that upload (a second agent remembers the shadow verdicts it reads).

Same delivery rules as the other workers: acks in offset order, only after the outputs are
acknowledged by the broker; a malformed decision is a dead letter; a label store that is down is
transient (the batch waits and retries, never acked without its row).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import faust
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from stream_guard import observability as obs
from stream_guard.errors import DependencyUnavailable, ErrorCode, EventError
from stream_guard.events import Decision, ReviewDecision, Verdict
from stream_guard.kafka import Health, InOrderAcks, Publisher, create_app, record_of
from stream_guard.pipeline.decide import dead_letter, unexpected
from stream_guard.pipeline.records import Output, Record, trace_headers
from stream_guard.quality.manifest import ManifestError
from stream_guard.retry import backoff_delays
from stream_guard.review.comparison import LabelledComparison
from stream_guard.review.decisions import final_verdict, manifest_row
from stream_guard.review.labels import LabelStore, open_label_store, record_row
from stream_guard.settings import Settings

__all__ = ["ReviewWorker", "create_review_worker"]

log = logging.getLogger(__name__)

DECISIONS = Counter(
    "stream_guard_review_decisions_total", "Reviewer decisions applied, by outcome", ["outcome"]
)
ROWS = Counter("stream_guard_review_manifest_rows_total", "Labelled rows, by outcome", ["outcome"])
LABELLED = Counter(
    "stream_guard_shadow_labelled_total",
    "Reviewed uploads scored by live and shadow policy: confusion counts per category",
    ["candidate", "side", "category", "outcome"],
)
PRECISION = Gauge(
    "stream_guard_shadow_precision",
    "Precision against reviewer labels (flagged = not allowed)",
    ["candidate", "side", "category"],
)
RECALL = Gauge(
    "stream_guard_shadow_recall",
    "Recall against reviewer labels (flagged = not allowed)",
    ["candidate", "side", "category"],
)
# Shadow verdicts remembered until their upload is reviewed (about 200 bytes each).
SHADOW_MEMORY = 100_000


class ReviewWorker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        t = settings.telemetry
        obs.setup_tracing(t.service_name + "-review", t.otlp_endpoint, t.span_file)
        self.health = Health(settings.batch.stall_after_s, waiting=lambda: self._busy)
        self.health.ready = True
        self.app = create_app(settings.kafka, t, settings.kafka.review_group, self.health)
        topics = settings.kafka.topics
        self.publisher = Publisher(
            self.app, {"verdicts": topics.verdicts, "dlq": topics.dlq}, settings.retry, self.health
        )
        self.decisions = self.app.topic(topics.review_decisions, value_type=bytes, key_type=bytes)
        self.shadow_topic = self.app.topic(topics.shadow_verdicts, value_type=bytes, key_type=bytes)
        manifest = settings.review.manifest
        self.labels: LabelStore | None = (
            open_label_store(manifest, settings.s3) if manifest else None
        )
        self.shadow: OrderedDict[str, Verdict] = OrderedDict()
        self.comparison = LabelledComparison()
        self._applied: OrderedDict[str, str] = OrderedDict()  # when there is no label store
        self._busy = False
        self._register()

    def _register(self) -> None:
        app, worker = self.app, self

        @app.agent(self.decisions, name="review-decisions")
        async def apply(stream: faust.StreamT) -> None:
            acks = InOrderAcks(stream)
            async for events in stream.noack_take(32, within=0.2):
                events = list(events)
                acks.received(events)
                await worker.handle(events)
                await acks.finish(events)
                worker.health.progressed()

        @app.agent(self.shadow_topic, name="review-shadow")
        async def remember(stream: faust.StreamT) -> None:
            acks = InOrderAcks(stream)
            async for events in stream.noack_take(256, within=0.5):
                events = list(events)
                acks.received(events)
                for e in events:
                    worker.remember_shadow(e.message.value)
                await acks.finish(events)

    # -- shadow verdicts ---------------------------------------------------------------------

    def remember_shadow(self, value: bytes | None) -> None:
        try:
            verdict = Verdict.model_validate_json(value or b"")
        except (ValidationError, ValueError, RecursionError) as e:
            log.warning("unreadable shadow verdict skipped: %s", str(e)[:300])
            return
        self.shadow[verdict.upload_id] = verdict
        self.shadow.move_to_end(verdict.upload_id)
        while len(self.shadow) > SHADOW_MEMORY:
            self.shadow.popitem(last=False)

    # -- decisions ---------------------------------------------------------------------------

    async def handle(self, events: list[Any]) -> None:
        self._busy = True
        try:
            records = [record_of(e) for e in events]
            outputs = []
            for record in records:
                outputs.extend(await self._apply_with_retry(record))
            await self.publisher.publish(outputs)
        finally:
            self._busy = False

    async def _apply_with_retry(self, record: Record) -> list[Output]:
        for delay in backoff_delays(self.settings.retry, forever=True):
            try:
                return await self.apply(record)
            except DependencyUnavailable as e:  # the label store: wait, never ack without it
                self.health.failing.add(e.dependency)
                obs.RETRIES.labels(e.dependency).inc()
                log.warning("decision %s waits: %s; retrying in %.1fs", record.where, e, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def apply(self, record: Record) -> list[Output]:
        """The outputs of one decision record (a verdict, a dead letter, or none)."""
        headers = trace_headers(record)
        try:
            decision = ReviewDecision.model_validate_json(record.value)
        except (ValidationError, ValueError, RecursionError) as e:
            DECISIONS.labels("invalid").inc()
            err = EventError(
                ErrorCode.EVENT_MALFORMED, f"not a ReviewDecision: {str(e)[:500]}", stage="review"
            )
            return dead_letter(record, err, headers=headers).outputs
        try:
            fresh = await self._record(decision)
        except DependencyUnavailable:
            raise
        except Exception as e:  # one bad decision never stops the agent
            return unexpected(record, e, "review").outputs
        self.health.failing.discard("labels")
        if fresh is None:  # another decision settled this upload first
            DECISIONS.labels("conflict").inc()
            log.warning(
                "decision %s for %s ignored: the upload was settled by another decision",
                decision.decision_id,
                decision.upload_id,
            )
            return []
        if fresh:
            DECISIONS.labels(str(decision.decision)).inc()
            self._compare(decision)
        verdict = final_verdict(decision)
        return [Output("verdicts", decision.upload_id.encode(), verdict.to_bytes(), headers)]

    async def _record(self, decision: ReviewDecision) -> bool | None:
        """True: first time this decision is seen; False: seen before (redelivery); None: the
        upload was already settled by a different decision."""
        if self.labels is None:
            return self._remember_applied(decision)
        try:
            row = manifest_row(decision)
        except ManifestError as e:
            ROWS.labels("invalid").inc()
            log.error("decision %s makes no manifest row: %s", decision.decision_id, e)
            return self._remember_applied(decision)
        if row is None:
            ROWS.labels("no_upload").inc()
            return self._remember_applied(decision)
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(None, record_row, self.labels, row)
        ROWS.labels(outcome).inc()
        return {"added": True, "duplicate": False, "conflict": None}[outcome]

    def _remember_applied(self, decision: ReviewDecision) -> bool | None:
        """Without a row in the store, the worker's memory (bounded) is what de-duplicates."""
        seen = self._applied.get(decision.upload_id)
        if seen is not None:
            return False if seen == decision.decision_id else None
        self._applied[decision.upload_id] = decision.decision_id
        while len(self._applied) > SHADOW_MEMORY:
            self._applied.popitem(last=False)
        return True

    def _compare(self, decision: ReviewDecision) -> None:
        shadow = self.shadow.get(decision.upload_id)
        if shadow is None or shadow.policy_id != decision.policy_id:
            return
        candidate = f"{shadow.policy_version}@{shadow.model_name}:{shadow.model_version}"
        live = [c.code for c in decision.reviewed.categories if c.decision != Decision.ALLOW]
        codes = [c.code for c in decision.reviewed.categories]
        for cand, side, code, outcome in self.comparison.observe(
            candidate, codes, decision.categories, live, shadow.flagged
        ):
            LABELLED.labels(cand, side, code, outcome).inc()
        for (cand, side, code), counts in self.comparison.items():
            if cand != candidate:
                continue
            if counts.precision is not None:
                PRECISION.labels(cand, side, code).set(counts.precision)
            if counts.recall is not None:
                RECALL.labels(cand, side, code).set(counts.recall)


def create_review_worker(settings: Settings | None = None) -> ReviewWorker:
    return ReviewWorker(settings or Settings())
