"""The fast worker: a Faust agent on ``guard.uploads``.

Delivery: at-least-once with idempotent outputs. Events come from ``stream.noack_take`` (never
``take``, which acks a failed batch: faust-streaming #189, #315); an event is acked only after
every record it produced (verdict, escalation or dead letter) is acknowledged by the broker, and
acks go to Faust in offset order per partition (``stream_guard.kafka.InOrderAcks``), so a
commit never passes an unfinished record. Up to ``batch.max_in_flight`` batches are processed at
once; when Triton or S3 is down a batch is retried with capped backoff, in-flight slots stay
taken, and the agent stops taking events: backpressure, never drops. When only some records of
a batch cannot be fetched (their bucket is missing or unreachable) the rest are finished and
the batch's slot freed; those records are retried alone, unacked, so the commit never passes
them, and ``max_unacked`` bounds how many finished records may wait behind them. Any error
that is not a dependency being down ends as a dead letter of that one record.

Batching (``stream_guard.kafka.BatchWindow``): the agent queues events as they arrive and a
dispatcher cuts batches when an in-flight slot is free: at once when no more records are known
to be waiting (low load: no batch window in the latency), else up to ``batch.window_s`` for up
to ``batch.max_size`` (a backlog: full batches).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import faust
from faust.types import TP
from opentelemetry.trace import SpanKind

from stream_guard import observability as obs
from stream_guard.errors import ErrorCode, PermanentError, TransientError
from stream_guard.kafka import (
    BatchWindow,
    Health,
    InOrderAcks,
    OutputTooLarge,
    Publisher,
    create_app,
    record_of,
)
from stream_guard.media.storage import ObjectStore
from stream_guard.pipeline.decide import dead_letter, unexpected
from stream_guard.pipeline.moderator import Moderator
from stream_guard.pipeline.records import Deferred, Record, Result
from stream_guard.pipeline.shadow import ShadowScorer  # shadow policy hook (issue 16)
from stream_guard.policy.live import LivePolicies
from stream_guard.retry import backoff_delays
from stream_guard.settings import Settings
from stream_guard.triton import GuardModels

__all__ = ["FastWorker", "create_worker"]

log = logging.getLogger(__name__)


class FastWorker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        t = settings.telemetry
        obs.setup_tracing(t.service_name, t.otlp_endpoint, t.span_file)
        self.health = Health(settings.batch.stall_after_s, waiting=self._work_waiting)
        self.app = create_app(settings.kafka, t, settings.kafka.consumer_group, self.health)
        topics = settings.kafka.topics
        self.publisher = Publisher(
            self.app,
            {
                "verdicts": topics.verdicts,
                "escalations": topics.escalations,
                "dlq": topics.dlq,
                "review": topics.review,
                "shadow": topics.shadow_verdicts,  # shadow policy hook (issue 16)
            },
            settings.retry,
            self.health,
        )
        self.uploads = self.app.topic(topics.uploads, value_type=bytes, key_type=bytes)
        self.models: GuardModels | None = None
        self.store: ObjectStore | None = None
        self.moderator: Moderator | None = None
        self.policies: LivePolicies | None = None
        self.shadow: ShadowScorer | None = None  # shadow policy hook (issue 16)
        self.acks: InOrderAcks | None = None
        self.window: BatchWindow | None = None
        self._started = asyncio.Event()
        self.in_flight = asyncio.Semaphore(settings.batch.max_in_flight)
        self.max_unacked = settings.batch.max_size * settings.batch.max_in_flight * 20
        self.tasks: set[asyncio.Task] = set()
        self.deferring: set[asyncio.Task] = set()  # batches left with deferred records only
        self.stopping = False
        self._register()

    # kept for tests and tools that read them directly
    @property
    def ready(self) -> bool:
        return self.health.ready

    @property
    def failing(self) -> set[str]:
        return self.health.down()

    def _work_waiting(self) -> bool:
        """Work that should be making progress: batches other than those only waiting for
        deferred records, and queued events, unless intake is stopped by the unacked bound
        because deferred records hold back the acks behind them."""
        if any(task not in self.deferring for task in self.tasks):
            return True
        if not (self.window and self.window.pending()):
            return False
        blocked = self.acks is not None and self.acks.pending() > self.max_unacked
        return not (blocked and self.health.held)

    # -- lifecycle ---------------------------------------------------------------------------

    async def _start_dependencies(self) -> None:
        s = self.settings
        self.models = GuardModels(s.triton)
        self.store = ObjectStore(s.s3)
        self.policies = LivePolicies(s, self.models)
        await self.policies.start()
        self.moderator = Moderator(s, self.models, self.store, self.policies.registry)
        if ShadowScorer.wanted(s):  # shadow policy hook (issue 16): scored beside, never acting
            self.shadow = ShadowScorer(s, self.models, self.store, self.publisher.publish)
            self.shadow.start()
        self._started.set()

    async def drain(self) -> None:
        """SIGTERM: let in-flight batches publish and ack within the grace period."""
        self.stopping = True
        if self.acks is not None:
            await self.acks.wake()  # the agent loop stops waiting for acks to drain
        if self.tasks:
            log.info("draining %d in-flight batches", len(self.tasks))
            # Keep 3 s of the grace period for committing offsets, leaving the group and
            # closing the loop (about 1.5 s measured on 2 cores).
            grace = self.settings.shutdown_grace_s
            _, pending = await asyncio.wait(self.tasks, timeout=max(grace - 3.0, grace / 2))
            for task in pending:
                task.cancel()
            if pending:  # their events stay unacked: the next owner of the partition redoes them
                log.warning("%d batches unfinished after the grace period", len(pending))
                await asyncio.wait(pending, timeout=1.0)
        await self._close()

    async def _close(self) -> None:
        if self.shadow is not None:  # shadow policy hook (issue 16)
            await self.shadow.close()
        if self.moderator is not None:
            self.moderator.close()
        if self.models is not None:
            await self.models.close()

    # -- the agent ---------------------------------------------------------------------------

    def _register(self) -> None:
        app = self.app
        worker = self

        @app.agent(self.uploads, name="fast-moderation")
        async def moderate(stream: faust.StreamT) -> None:
            batch_cfg = worker.settings.batch
            worker.acks = acks = InOrderAcks(stream)
            worker.window = window = BatchWindow(
                batch_cfg.max_size, batch_cfg.window_s, worker._highwater
            )
            dispatcher = asyncio.ensure_future(worker._dispatch(window, acks))
            dispatcher.add_done_callback(worker._dispatcher_done)
            try:
                # One event per take, as it arrives: the window decides how long a batch waits.
                await window.feed(stream.noack_take(1, within=1.0))
            finally:
                dispatcher.cancel()

        @app.task
        async def startup() -> None:
            await worker._start_dependencies()
            await worker._probe()  # readiness and dependency metrics known at once
            worker.health.ready = True
            log.info("fast worker ready")

        @app.timer(interval=2.0)
        async def probe() -> None:
            await worker._probe()

        @app.timer(interval=self.settings.policy.reload_interval_s)
        async def reload_policies() -> None:
            if worker.policies is not None:
                await worker.policies.reload()

        @app.on_before_shutdown.connect
        async def on_shutdown(app, **kwargs):  # type: ignore[no-untyped-def]
            await worker.drain()

    async def _dispatch(self, window: BatchWindow, acks: InOrderAcks) -> None:
        """Cut batches from the window whenever an in-flight slot is free, and start them."""
        while True:
            await self.in_flight.acquire()
            events = await window.next_batch()
            acks.received(events)
            # Finished events wait for an earlier one still retrying: bound how many
            # (memory, and the redo after a crash) by not taking more meanwhile.
            await acks.wait_below(self.max_unacked, give_up=lambda: self.stopping)
            if self.stopping:  # draining: leave the batch unacked for the next owner
                self.in_flight.release()
                continue
            task = asyncio.ensure_future(self._handle(events))
            self.tasks.add(task)
            task.add_done_callback(self._batch_done)

    def _highwater(self, topic: str, partition: int) -> int | None:
        """The high watermark of the last fetch response for a partition (never ListOffsets)."""
        return self.app.consumer.highwater(TP(topic, partition))

    @staticmethod
    def _dispatcher_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug: events queue up unprocessed and liveness fails (work waiting, no progress),
            # so Kubernetes restarts the worker; nothing is acked meanwhile.
            log.error("batch dispatcher failed", exc_info=task.exception())

    def _batch_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.deferring.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # _handle turns every error into a dead letter; reaching this is a bug. The events
            # stay unacked (nothing later of their partitions commits) and liveness reports it.
            log.error("batch task failed", exc_info=task.exception())

    async def _handle(self, events: list[Any]) -> None:
        obs.IN_FLIGHT.inc()
        slot = True
        held: Counter[str] = Counter()  # dependencies this batch's deferred records wait on
        try:
            await self._started.wait()
            records = [record_of(e) for e in events]
            obs.BATCH_SIZE.observe(len(records))
            links = (
                [link for r in records if (link := obs.link_to(r.headers))]
                if obs.recording()
                else []
            )
            with obs.span(
                f"{records[0].topic} process batch",
                kind=SpanKind.CONSUMER,
                links=links,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.batch.message_count": len(records),
                },
            ):
                delays = backoff_delays(self.settings.retry, forever=True)
                while True:
                    results = await self._process_with_retry(records)
                    await self._finish(records, events, results)
                    self._hold(held, -1)
                    waiting = [n for n, r in enumerate(results) if isinstance(r, Deferred)]
                    held = Counter(_dependency(results[n]) for n in waiting)
                    self._hold(held, +1)  # until they finish (the probe cannot clear it)
                    if not waiting:
                        break
                    if slot:  # the rest of the batch is done: let the next batch start
                        slot = False
                        self.in_flight.release()
                        if (task := asyncio.current_task()) is not None:
                            self.deferring.add(task)
                    records = [records[n] for n in waiting]
                    events = [events[n] for n in waiting]
                    await self._wait_deferred([results[n] for n in waiting], next(delays))
        finally:
            self._hold(held, -1)
            obs.IN_FLIGHT.dec()
            obs.UNACKED.set(self.acks.pending() if self.acks else 0)
            if slot:
                self.in_flight.release()

    async def _finish(self, records: list[Record], events: list[Any], results: list) -> None:
        """Publish and ack the records that have a result (Deferred ones wait, unacked: the
        commit cannot pass them, and the max-unacked bound stops intake if too many wait)."""
        done = [n for n, r in enumerate(results) if not isinstance(r, Deferred)]
        if not done:
            return
        finished = [results[n] for n in done]
        with obs.span("publish", kind=SpanKind.PRODUCER):
            await self._publish(finished)
        assert self.acks is not None
        await self.acks.finish([events[n] for n in done])
        self.health.progressed()
        self._observe(finished, [events[n] for n in done])
        if self.shadow is not None:  # shadow policy hook (issue 16): after the acks
            self.shadow.submit([records[n] for n in done], finished)

    def _hold(self, held: Counter[str], sign: int) -> None:
        for dep, records in held.items():
            self.health.hold(dep, sign * records)

    async def _wait_deferred(self, deferred: list[Deferred], delay: float) -> None:
        dep = _dependency(deferred[0])
        obs.RETRIES.labels(dep).inc()
        log.warning(
            "%d record(s) from %s: %s; retrying them in %.1fs, the rest of the batch went on",
            len(deferred),
            deferred[0].record.where,
            deferred[0].error,
            delay,
        )
        await asyncio.sleep(delay)

    async def _process_with_retry(self, records: list[Record]) -> list[Result | Deferred]:
        assert self.moderator is not None
        for delay in backoff_delays(self.settings.retry, forever=True):
            try:
                start = time.perf_counter()
                results = await self.moderator.process(records)
                obs.STAGE_SECONDS.labels("process").observe(time.perf_counter() - start)
                return results
            except TransientError as e:
                dep = getattr(e, "dependency", "unknown")
                self.health.failing.add(dep)
                obs.RETRIES.labels(dep).inc()
                log.warning(
                    "batch %s..%s: %s; retrying in %.1fs",
                    records[0].where,
                    records[-1].where,
                    e,
                    delay,
                )
                await asyncio.sleep(delay)
            except Exception as e:  # the moderator keeps errors per record; this is a bug
                return [unexpected(r, e, "process") for r in records]
        raise AssertionError("unreachable")

    async def _publish(self, results: list[Result]) -> None:
        start = time.perf_counter()
        # The provisional verdict is acknowledged before its escalation exists, so a final
        # verdict from the reasoning tier can never overtake it on the verdict topic.
        for phase in ("first", "escalations"):
            while True:
                outputs = [
                    o
                    for r in results
                    for o in r.outputs
                    if (o.role == "escalations") == (phase == "escalations")
                ]
                try:
                    await self.publisher.publish(outputs)
                    break
                except OutputTooLarge as e:  # permanent: that record becomes a dead letter
                    self._replace_too_large(results, e)
        obs.STAGE_SECONDS.labels("publish").observe(time.perf_counter() - start)

    @staticmethod
    def _replace_too_large(results: list[Result], e: OutputTooLarge) -> None:
        for n, r in enumerate(results):
            if any(o is e.output for o in r.outputs):
                error = PermanentError(ErrorCode.OUTPUT_TOO_LARGE, str(e), stage="publish")
                letter = dead_letter(r.record, error, r.upload_id)
                if e.output.role == "dlq":  # even a bounded dead letter was refused: no copy
                    empty = Record(None, b"", r.record.topic, r.record.partition, r.record.offset)
                    letter = dead_letter(empty, error, r.upload_id)
                    letter.record = r.record
                results[n] = letter
                return

    def _observe(self, results: list[Result], events: list[Any]) -> None:
        now = time.time()
        for result, event in zip(results, events, strict=True):
            obs.EVENTS.labels(result.outcome).inc()
            if result.error_code:
                obs.DEAD_LETTERS.labels(result.error_code).inc()
            ts = getattr(event.message, "timestamp", None)
            if ts:
                obs.END_TO_END_SECONDS.observe(max(now - ts, 0.0))

    # -- readiness -------------------------------------------------------------------------

    async def _probe(self) -> None:
        if self.models is None or self.store is None:
            return
        loop = asyncio.get_running_loop()
        checks = {
            "triton": await self.models.ready(),
            "s3": await loop.run_in_executor(None, self.store.ping),
            "kafka": await self._broker_reachable(),
        }
        for dep, ok in checks.items():
            obs.DEPENDENCY_UP.labels(dep).set(1 if ok else 0)
            if ok:
                self.health.failing.discard(dep)
            else:
                self.health.failing.add(dep)
        self.health.publish_metrics()
        await self._observe_lag()

    async def _broker_reachable(self) -> bool:
        """A TCP connect to any bootstrap server: cheap, and false while the broker is down
        (aiokafka itself only retries quietly)."""
        for server in self.settings.kafka.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host.strip("[]"), int(port)), 1.0
                )
            except (OSError, TimeoutError, ValueError):
                continue
            writer.close()
            return True
        return False

    async def _observe_lag(self) -> None:
        """Backlog per partition: the fetch response's high watermark minus the offset this
        group has committed (records fetched into memory but not finished still count). Never
        ListOffsets, which some Kafka-compatible brokers answer wrongly."""
        try:
            consumer = self.app.consumer
            committed_offsets = getattr(consumer, "_committed_offset", {})
            for tp in consumer.assignment():
                if tp.topic != self.uploads.get_topic_name():
                    continue
                high = consumer.highwater(tp)
                first = self.acks.first_pending(tp.topic, tp.partition) if self.acks else None
                done = first if first is not None else committed_offsets.get(tp)
                if done is None:
                    done = await consumer.position(tp)
                if high is not None and done is not None:
                    obs.CONSUMER_LAG.labels(str(tp.partition)).set(max(high - done, 0))
        except Exception as e:  # metrics must never take the worker down
            log.debug("consumer lag not observed: %r", e)


def create_worker(settings: Settings | None = None) -> FastWorker:
    return FastWorker(settings or Settings())


def _dependency(deferred: Deferred) -> str:
    return getattr(deferred.error, "dependency", "unknown")
