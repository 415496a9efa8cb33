"""Everything both workers need from Kafka and Faust, in one place.

Faust is thinly maintained upstream (faust-streaming #667): the rest of the project talks to it
only through this module. It holds the broker options and credentials, the fetch-wait patch, the
app with its ``/healthz`` ``/readyz`` ``/metrics`` pages, in-order acknowledgement (so offsets are
only ever committed over a contiguous processed prefix) and publishing with retry.

Delivery rules kept here:

- **Acks in offset order per partition.** faust 0.15.3 commits the first consecutive run of
  acked offsets, and checks for a gap before it only ``if committed_offset:`` (never while a
  partition's committed offset is None or 0). With several batches in flight a later batch's acks
  could then commit past an earlier batch still retrying, and a crash would lose it.
  :class:`InOrderAcks` holds back an event's ack until every earlier event of its partition that
  this worker received is finished, so Faust only ever sees a contiguous prefix.
- **Publishing**: broker errors are transient and retried forever (backpressure); an output the
  producer refuses as too large is a permanent error of that output, never retried.
- **Batching** (:class:`BatchWindow`): a batch leaves at once when no further record is known to
  be waiting, and waits up to the batch window for a fuller batch only while the broker holds
  more for this worker: low latency at low load, full batches under a backlog.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
import faust.transport.drivers.aiokafka as _faust_aiokafka
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError
from prometheus_client import generate_latest

from stream_guard import observability as obs
from stream_guard.pipeline.records import MAX_OUTPUT_BYTES, Output, Record
from stream_guard.retry import backoff_delays
from stream_guard.settings import KafkaSettings, RetrySettings, TelemetrySettings

__all__ = [
    "aiokafka_options",
    "FETCH_MAX_WAIT_MS",
    "BatchWindow",
    "Health",
    "InOrderAcks",
    "OutputTooLarge",
    "Publisher",
    "create_app",
    "faust_broker_options",
    "message_headers",
    "record_of",
]

log = logging.getLogger(__name__)

# faust-streaming creates its consumer with fetch_max_wait_ms=1500 and no setting to change it.
# A broker that holds a fetch until that deadline then adds up to the deadline to every upload.
# Tansu answers a held fetch after up to half the wait even when a record arrives meanwhile, and
# each held fetch costs it CPU. Measured at 50 uploads/s (consume latency p50 / p99, broker CPU):
# 50 ms 13 / 28 ms, 3 %; 25 ms 6 / 10 ms, 6 %; 10 ms 4 / 8 ms, 10 % of a core. So the wait is a
# setting (``kafka.fetch_max_wait_ms``) and this its default.
FETCH_MAX_WAIT_MS = KafkaSettings.model_fields["fetch_max_wait_ms"].default
_create_consumer = _faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer


def _create_worker_consumer(self, transport):  # type: ignore[no-untyped-def]
    consumer = _create_consumer(self, transport)
    consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", FETCH_MAX_WAIT_MS)
    return consumer


_faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer


def faust_broker_options(kafka: KafkaSettings, app_id: str) -> dict[str, Any]:
    servers = ";".join(f"kafka://{s.strip()}" for s in kafka.bootstrap_servers.split(","))
    options: dict[str, Any] = dict(
        id=app_id,
        broker=servers,
        value_serializer="raw",
        key_serializer="raw",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.heartbeat_interval_s,
        broker_commit_interval=0.5,
        topic_allow_declare=False,
        topic_disable_leader=True,
        producer_acks=-1,
        store="memory://",
        # Faust keeps table state on disk; workers are stateless, so keep it out of the image.
        datadir=os.path.join(tempfile.gettempdir(), f"stream-guard-{app_id}"),
    )
    if kafka.security_protocol != "PLAINTEXT":
        options["broker_credentials"] = _credentials(kafka)
    return options


def _credentials(kafka: KafkaSettings) -> Any:
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(
            cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None
        )
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(context)
    password = kafka.sasl_password.get_secret_value() if kafka.sasl_password else ""
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=password,
        ssl_context=context,
        mechanism=kafka.sasl_mechanism or "PLAIN",
    )


def aiokafka_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Plain aiokafka client keyword arguments (tools beside the workers: CLI, review console):
    bootstrap servers, security protocol, TLS and SASL, from the same settings as Faust's."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context(
            cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None
        )
    if kafka.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = kafka.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = (
            kafka.sasl_password.get_secret_value() if kafka.sasl_password else ""
        )
    return options


def message_headers(record_headers: Any) -> dict[str, bytes]:
    if not record_headers:
        return {}
    items: Iterable = record_headers.items() if isinstance(record_headers, dict) else record_headers
    return {str(k): bytes(v) for k, v in items if v is not None}


def record_of(event: Any) -> Record:
    """The pipeline's view of one Faust event."""
    m = event.message
    return Record(
        key=m.key,
        value=m.value or b"",
        topic=m.topic,
        partition=m.partition,
        offset=m.offset,
        headers=message_headers(m.headers),
    )


# -- acknowledgement ------------------------------------------------------------------------


class InOrderAcks:
    """Acks a stream's events per partition in the order they were received.

    ``received`` is called in the agent loop as each batch is taken (so per partition in offset
    order); ``finish`` when a batch's outputs are acknowledged by the broker. An event whose
    predecessors are still in progress waits here; a batch that never finishes (cancelled on
    drain, worker killed) therefore holds back every later commit of its partitions, and the
    next owner redoes them: at-least-once, never a commit past unprocessed work.
    """

    def __init__(self, stream: faust.StreamT) -> None:
        self.stream = stream
        self._order: dict[tuple[str, int], deque[int]] = {}
        self._done: dict[tuple[str, int], dict[int, Any]] = {}
        self._changed = asyncio.Condition()

    def received(self, events: Sequence[Any]) -> None:
        for e in events:
            tp = (e.message.topic, e.message.partition)
            order = self._order.setdefault(tp, deque())
            if order and e.message.offset <= order[-1]:
                # Redelivery after a rebalance or seek: the log restarts from the committed
                # offset, so older bookkeeping for this partition no longer applies.
                order.clear()
                self._done.pop(tp, None)
            order.append(e.message.offset)

    async def finish(self, events: Sequence[Any]) -> None:
        touched = set()
        for e in events:
            tp = (e.message.topic, e.message.partition)
            self._done.setdefault(tp, {})[e.message.offset] = e
            touched.add(tp)
        for tp in touched:
            order, done = self._order.get(tp, deque()), self._done.get(tp, {})
            while order and order[0] in done:
                await self.stream.ack(done.pop(order.popleft()))
        await self.wake()

    async def wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_below(self, limit: int, give_up: Callable[[], bool] = lambda: False) -> None:
        """Wait until at most ``limit`` received events are unacked (or ``give_up()``)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.pending() <= limit or give_up())

    def pending(self) -> int:
        return sum(len(o) for o in self._order.values())

    def first_pending(self, topic: str, partition: int) -> int | None:
        order = self._order.get((topic, partition))
        return order[0] if order else None


# -- batching -------------------------------------------------------------------------------


class BatchWindow:
    """Cuts the events an agent takes into batches, with a window that adapts to the backlog.

    ``feed`` takes events one at a time (``stream.noack_take(1, ...)`` yields each as it
    arrives, so no timer stands between a record and its batch) into a queue of ``max_size``;
    when the queue is full, ``feed`` waits and the stream stops taking (backpressure).
    ``next_batch`` returns the queued events at once when no more are known to be waiting, and
    otherwise waits up to ``window_s`` after its first event for the batch to fill:

    - *known to be waiting*: events queued here, plus per partition the high watermark of the
      last fetch response (``highwater(topic, partition)``) past the last offset taken. Those
      records exist in the broker or in the consumer's buffers and arrive within a fetch.
    - At low load the backlog is empty and every event goes alone, without waiting; under a
      backlog batches leave full (``max_size``) or after ``window_s``, whichever comes first.
      While every in-flight slot is busy the caller does not ask, and the queue fills up.
    """

    def __init__(
        self,
        max_size: int,
        window_s: float,
        highwater: Callable[[str, int], int | None] = lambda topic, partition: None,
    ) -> None:
        self.max_size = max_size
        self.window_s = window_s
        self.highwater = highwater
        self.queue: asyncio.Queue[Any] = asyncio.Queue(max_size)
        self._last: dict[tuple[str, int], int] = {}

    async def feed(self, chunks: AsyncIterable[Sequence[Any]]) -> None:
        """Queue every event of ``chunks`` (the agent's stream), in stream order."""
        async for chunk in chunks:
            for event in chunk:
                m = event.message
                self._last[(m.topic, m.partition)] = m.offset
                await self.queue.put(event)

    def backlog(self) -> int:
        """Events queued here plus records the broker is known to hold past the last taken."""
        waiting = self.queue.qsize()
        for (topic, partition), last in list(self._last.items()):
            try:
                high = self.highwater(topic, partition)
            except Exception:  # noqa: BLE001 - a revoked partition: nothing is coming from it
                high = None
            if high is None:
                self._last.pop((topic, partition), None)
            else:
                waiting += max(high - 1 - last, 0)
        return waiting

    async def next_batch(self) -> list[Any]:
        """The next batch: at least one event, at most ``max_size``, in stream order."""
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.window_s
        while True:
            while len(batch) < self.max_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            remaining = deadline - time.monotonic()
            if len(batch) >= self.max_size or remaining <= 0 or not self.backlog():
                return batch
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                return batch

    def pending(self) -> int:
        return self.queue.qsize()


# -- health ---------------------------------------------------------------------------------


@dataclass
class Health:
    """What the probes report. ``live`` fails when work is waiting (``waiting()`` true), no
    batch has finished for ``stall_after_s`` and no dependency is known to be down: Kubernetes
    then restarts a wedged worker. A worker waiting out a dependency's outage stays live (and
    unready): restarting it would not bring the dependency back.

    Two kinds of "down": ``failing`` is what the last probe or call found (a probe that
    succeeds clears it), ``held`` counts records waiting on a dependency only they need (an
    upload whose bucket is missing while the store answers the probe). A held dependency stays
    down for readiness until its records finish. It does not excuse a stall: the worker leaves
    the work that only waits for held records out of ``waiting()`` instead, so one upload
    waiting for its bucket neither makes the worker look wedged nor hides a real wedge of the
    rest of its work."""

    stall_after_s: float
    waiting: Callable[[], bool] = lambda: False
    ready: bool = False
    failing: set[str] = field(default_factory=set)
    held: dict[str, int] = field(default_factory=dict)
    last_progress: float = field(default_factory=time.monotonic)

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def hold(self, dependency: str, records: int) -> None:
        """``records`` more (negative: fewer) records wait on ``dependency``."""
        left = self.held.get(dependency, 0) + records
        if left < 0:  # a release without its hold: a bug, never a reason to hide another's
            log.error("released %d records held on %s more than were held", -left, dependency)
        if left > 0:
            self.held[dependency] = left
        else:
            self.held.pop(dependency, None)

    def down(self) -> set[str]:
        return self.failing | set(self.held)

    def stalled_for(self) -> float:
        return time.monotonic() - self.last_progress if self.waiting() else 0.0

    def live(self) -> bool:
        return bool(self.failing) or self.stalled_for() < self.stall_after_s

    def is_ready(self) -> bool:
        return self.ready and not self.down() and self.live()

    def publish_metrics(self) -> None:
        obs.READY.set(1 if self.is_ready() else 0)
        obs.STALLED_SECONDS.set(self.stalled_for())


def create_app(
    kafka: KafkaSettings, telemetry: TelemetrySettings, app_id: str, health: Health
) -> faust.App:
    """A Faust app with the probe pages. Faust's own wait for unacked messages on shutdown has
    no deadline, so ``stream_wait_empty`` is off: each worker bounds its drain itself."""
    app = faust.App(
        **faust_broker_options(kafka, app_id),
        stream_wait_empty=False,
        web_enabled=True,
        web_bind=telemetry.http_host,
        web_port=telemetry.metrics_port,
    )
    app.fetch_max_wait_ms = kafka.fetch_max_wait_ms  # read by _create_worker_consumer

    @app.page("/healthz")
    async def healthz(web, request):  # type: ignore[no-untyped-def]
        stalled = health.stalled_for()
        if health.live():
            return web.json({"status": "alive"})
        return web.json({"status": "stalled", "stalled_s": round(stalled, 1)}, status=503)

    @app.page("/readyz")
    async def readyz(web, request):  # type: ignore[no-untyped-def]
        ok = health.is_ready()
        failing = sorted(health.down() | (set() if health.live() else {"progress"}))
        return web.json({"ready": ok, "failing": failing}, status=200 if ok else 503)

    @app.page("/metrics")
    async def metrics(web, request):  # type: ignore[no-untyped-def]
        health.publish_metrics()
        return web.bytes(generate_latest(), content_type=obs.PROM_CONTENT_TYPE)

    return app


# -- publishing -----------------------------------------------------------------------------


class OutputTooLarge(Exception):
    """The producer refused an output as larger than its request limit (permanent)."""

    def __init__(self, output: Output) -> None:
        super().__init__(f"{output.role} record of {len(output.value)} bytes is too large")
        self.output = output


class Publisher:
    """Sends outputs to their topics and waits for the broker's acknowledgement."""

    def __init__(
        self, app: faust.App, topics: dict[str, str], retry: RetrySettings, health: Health
    ) -> None:
        self.app = app
        self.topics = topics
        self.retry = retry
        self.health = health

    async def _send(self, outputs: Sequence[Output]) -> None:
        for o in outputs:  # checked before anything is sent
            if len(o.value) + len(o.key or b"") > MAX_OUTPUT_BYTES:
                raise OutputTooLarge(o)
        producer = self.app.producer
        futures = []
        for o in outputs:
            # send() only appends to the producer's buffer; it awaits when a partition's buffer
            # is full, and then this also counts what ran meanwhile (see benchmarks/README.md).
            with obs.cpu_stage("publish"):
                futures.append(
                    await producer.send(
                        self.topics[o.role],
                        o.key,
                        o.value,
                        partition=None,
                        timestamp=None,
                        headers=list(o.headers.items()),
                    )
                )
        results = await asyncio.gather(*futures, return_exceptions=True)
        for o, r in zip(outputs, results, strict=True):
            if isinstance(r, MessageSizeTooLargeError | RecordTooLargeError):
                raise OutputTooLarge(o) from r
            if isinstance(r, BaseException):
                raise r

    async def publish(self, outputs: Sequence[Output]) -> None:
        """Publish until the broker acknowledges every output; raises only ``OutputTooLarge``
        (the caller replaces that output and publishes again)."""
        if not outputs:
            return
        for delay in backoff_delays(self.retry, forever=True):
            try:
                await self._send(outputs)
                self.health.failing.discard("kafka")
                return
            except (OutputTooLarge, asyncio.CancelledError):
                raise
            except Exception as e:  # aiokafka errors, timeouts: transient here
                self.health.failing.add("kafka")
                obs.RETRIES.labels("kafka").inc()
                log.warning(
                    "publishing %d records failed: %r; retrying in %.1fs", len(outputs), e, delay
                )
                await asyncio.sleep(delay)
