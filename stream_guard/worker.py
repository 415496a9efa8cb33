"""The fast worker: a Faust agent on ``guard.uploads``.

Delivery: at-least-once with idempotent outputs. Events come from ``stream.noack_take`` (never
``take``, which acks a failed batch: faust-streaming #189, #315); an event is acked only after
every record it produced (verdict, escalation or dead letter) is acknowledged by the broker.
Up to ``batch.max_in_flight`` batches are processed at once; when Triton or S3 is down a batch
is retried with capped backoff, in-flight slots stay taken, and the agent stops taking events:
backpressure, never drops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import faust
import faust.transport.drivers.aiokafka as _faust_aiokafka
from opentelemetry.trace import SpanKind
from prometheus_client import generate_latest

from . import telemetry as tm
from . import tracing
from .errors import TransientError
from .heads import ensure_head
from .inference import GuardModels
from .pipeline import Moderator, Output, Record, Result
from .policies_runtime import ActiveHead, PolicyRegistry
from .policy import load_policy
from .retry import backoff_delays
from .settings import KafkaSettings, Settings
from .storage import ObjectStore
from .telemetry import PROM_CONTENT_TYPE

log = logging.getLogger(__name__)

# faust-streaming creates its consumer with fetch_max_wait_ms=1500 and no setting to change it.
# A broker that holds a fetch until that deadline (Tansu does) then adds up to 1.5 s to every
# upload at low traffic; the benchmark measured p50 ~700 ms -> ~80 ms at 25 % load with 50 ms.
FETCH_MAX_WAIT_MS = 50
_create_consumer = _faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer


def _create_worker_consumer(self, transport):  # type: ignore[no-untyped-def]
    consumer = _create_consumer(self, transport)
    consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
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
    import ssl

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


def _headers(record_headers: Any) -> dict[str, bytes]:
    if not record_headers:
        return {}
    items: Iterable = record_headers.items() if isinstance(record_headers, dict) else record_headers
    return {str(k): bytes(v) for k, v in items if v is not None}


class FastWorker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        t = settings.telemetry
        tracing.setup_tracing(t.service_name, t.otlp_endpoint, t.span_file)
        opts = faust_broker_options(settings.kafka, settings.kafka.consumer_group)
        self.app = faust.App(
            **opts,
            # Faust's own wait for unacked messages on shutdown has no deadline (with Triton
            # down SIGTERM never exits): drain() bounds it by shutdown_grace_s instead, and the
            # consumer commits the acked offsets when it stops.
            stream_wait_empty=False,
            web_enabled=True,
            web_bind=settings.telemetry.http_host,
            web_port=settings.telemetry.metrics_port,
        )
        topics = settings.kafka.topics
        self.topic_names = {
            "verdicts": topics.verdicts,
            "escalations": topics.escalations,
            "dlq": topics.dlq,
            "review": topics.review,
        }
        self.uploads = self.app.topic(topics.uploads, value_type=bytes, key_type=bytes)
        self.models: GuardModels | None = None
        self.store: ObjectStore | None = None
        self.moderator: Moderator | None = None
        self._started = asyncio.Event()
        self.registry: PolicyRegistry | None = None
        self.in_flight = asyncio.Semaphore(settings.batch.max_in_flight)
        self.tasks: set[asyncio.Task] = set()
        self.failing: set[str] = set()
        self.ready = False
        self.stopping = False
        self._policy_digests: dict[str, str] = {}
        self._register()

    # -- lifecycle ---------------------------------------------------------------------------

    async def _start_dependencies(self) -> None:
        s = self.settings
        self.models = GuardModels(s.triton)
        self.store = ObjectStore(s.s3)
        policies = {"": load_policy(s.policy.path)}
        for tenant, path in s.policy.tenants.items():
            policies[tenant] = load_policy(path)
        heads: dict[str, ActiveHead] = {}
        for delay in backoff_delays(s.retry, forever=True):
            try:
                by_id: dict[str, ActiveHead] = {}
                for tenant, policy in policies.items():
                    if policy.policy_id not in by_id:
                        by_id[policy.policy_id] = await ensure_head(
                            policy,
                            self.models,
                            prefix=s.triton.head_model,
                            repo=s.triton.model_repository,
                        )
                    heads[tenant] = by_id[policy.policy_id]
                break
            except TransientError as e:
                log.warning("waiting for Triton to serve the policy heads: %s", e)
                tm.RETRIES.labels("triton").inc()
                await asyncio.sleep(delay)
        default = heads.pop("")
        self.registry = PolicyRegistry(default, heads)
        for head in self.registry.heads():
            self._policy_digests[head.policy.policy_id] = head.policy.digest
            tm.POLICY_VERSION.labels(
                head.policy.policy_id, head.policy.effective_version, head.model_version
            ).set(1)
        self.moderator = Moderator(s, self.models, self.store, self.registry)
        self._started.set()

    async def drain(self) -> None:
        """SIGTERM: let in-flight batches publish and ack within the grace period."""
        self.stopping = True
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

    # -- the agent ---------------------------------------------------------------------------

    def _register(self) -> None:
        app = self.app
        worker = self

        @app.agent(self.uploads, name="fast-moderation")
        async def moderate(stream: faust.StreamT) -> None:
            batch_cfg = worker.settings.batch
            async for events in stream.noack_take(batch_cfg.max_size, within=batch_cfg.window_s):
                await worker.in_flight.acquire()
                if worker.stopping:  # draining: leave the batch unacked for the next owner
                    worker.in_flight.release()
                    continue
                task = asyncio.ensure_future(worker._handle(stream, list(events)))
                worker.tasks.add(task)
                task.add_done_callback(worker.tasks.discard)

        @app.task
        async def startup() -> None:
            await worker._start_dependencies()
            worker.ready = True
            log.info("fast worker ready")

        @app.timer(interval=2.0)
        async def probe() -> None:
            await worker._probe()

        @app.timer(interval=self.settings.policy.reload_interval_s)
        async def reload_policies() -> None:
            await worker._reload_policies()

        @app.page("/healthz")
        async def healthz(web, request):  # type: ignore[no-untyped-def]
            return web.json({"status": "alive"})

        @app.page("/readyz")
        async def readyz(web, request):  # type: ignore[no-untyped-def]
            ok = worker.ready and not worker.failing
            body = {"ready": ok, "failing": sorted(worker.failing)}
            return web.json(body, status=200 if ok else 503)

        @app.page("/metrics")
        async def metrics(web, request):  # type: ignore[no-untyped-def]
            return web.bytes(generate_latest(), content_type=PROM_CONTENT_TYPE)

        @app.on_before_shutdown.connect
        async def on_shutdown(app, **kwargs):  # type: ignore[no-untyped-def]
            await worker.drain()

    async def _wait_started(self) -> None:
        await self._started.wait()

    async def _handle(self, stream: faust.StreamT, events: list[Any]) -> None:
        tm.IN_FLIGHT.inc()
        try:
            await self._wait_started()
            records = [
                Record(
                    key=e.message.key,
                    value=e.message.value or b"",
                    topic=e.message.topic,
                    partition=e.message.partition,
                    offset=e.message.offset,
                    headers=_headers(e.message.headers),
                )
                for e in events
            ]
            tm.BATCH_SIZE.observe(len(records))
            links = [link for r in records if (link := tracing.link_to(r.headers))]
            with tracing.tracer().start_as_current_span(
                f"{records[0].topic} process batch",
                kind=SpanKind.CONSUMER,
                links=links,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.batch.message_count": len(records),
                },
            ):
                results = await self._process_with_retry(records)
                with tracing.tracer().start_as_current_span("publish", kind=SpanKind.PRODUCER):
                    await self._publish_with_retry(results)
            for event in events:
                await stream.ack(event)
            self._observe(results, events)
        finally:
            tm.IN_FLIGHT.dec()
            self.in_flight.release()

    async def _process_with_retry(self, records: list[Record]) -> list[Result]:
        assert self.moderator is not None
        for delay in backoff_delays(self.settings.retry, forever=True):
            try:
                start = time.perf_counter()
                results = await self.moderator.process(records)
                tm.STAGE_SECONDS.labels("process").observe(time.perf_counter() - start)
                self.failing.discard("process")
                return results
            except TransientError as e:
                dep = getattr(e, "dependency", "unknown")
                self.failing.add(dep)
                tm.RETRIES.labels(dep).inc()
                log.warning(
                    "batch %s..%s: %s; retrying in %.1fs",
                    records[0].where,
                    records[-1].where,
                    e,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _send(self, outputs: list[Output]) -> None:
        producer = self.app.producer
        futures = [
            await producer.send(
                self.topic_names[o.role],
                o.key,
                o.value,
                partition=None,
                timestamp=None,
                headers=list(o.headers.items()),
            )
            for o in outputs
        ]
        await asyncio.gather(*futures)

    async def _publish_with_retry(self, results: list[Result]) -> None:
        first = [o for r in results for o in r.outputs if o.role != "escalations"]
        then = [o for r in results for o in r.outputs if o.role == "escalations"]
        start = time.perf_counter()
        # The provisional verdict is acknowledged before its escalation exists, so a final
        # verdict from the reasoning tier can never overtake it on the verdict topic.
        for outputs in (first, then):
            if not outputs:
                continue
            for delay in backoff_delays(self.settings.retry, forever=True):
                try:
                    await self._send(outputs)
                    self.failing.discard("kafka")
                    break
                except Exception as e:  # aiokafka errors, timeouts: all transient here
                    self.failing.add("kafka")
                    tm.RETRIES.labels("kafka").inc()
                    log.warning(
                        "publishing %d records failed: %r; retrying in %.1fs",
                        len(outputs),
                        e,
                        delay,
                    )
                    await asyncio.sleep(delay)
        tm.STAGE_SECONDS.labels("publish").observe(time.perf_counter() - start)

    def _observe(self, results: list[Result], events: list[Any]) -> None:
        now = time.time()
        for result, event in zip(results, events, strict=True):
            tm.EVENTS.labels(result.outcome).inc()
            if result.error_code:
                tm.DEAD_LETTERS.labels(result.error_code).inc()
            ts = getattr(event.message, "timestamp", None)
            if ts:
                tm.END_TO_END_SECONDS.observe(max(now - ts, 0.0))

    # -- readiness and policy reload -----------------------------------------------------------

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
            tm.DEPENDENCY_UP.labels(dep).set(1 if ok else 0)
            if ok:
                self.failing.discard(dep)
            else:
                self.failing.add(dep)
        tm.READY.set(1 if self.ready and not self.failing else 0)
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
        """Consumer lag per partition: the fetch response's high watermark minus our position
        (never ListOffsets, which some Kafka-compatible brokers answer wrongly)."""
        try:
            consumer = self.app.consumer
            for tp in consumer.assignment():
                if tp.topic != self.uploads.get_topic_name():
                    continue
                high, pos = consumer.highwater(tp), await consumer.position(tp)
                if high is not None and pos is not None:
                    tm.CONSUMER_LAG.labels(str(tp.partition)).set(max(high - pos, 0))
        except Exception as e:  # metrics must never take the worker down
            log.debug("consumer lag not observed: %r", e)

    async def _reload_policies(self) -> None:
        if self.registry is None or self.models is None:
            return
        s = self.settings
        paths = {s.policy.path, *s.policy.tenants.values()}
        for path in paths:
            try:
                policy = load_policy(path)
            except Exception as e:
                log.error("policy %s not reloaded, keeping the running version: %s", path, e)
                continue
            if self._policy_digests.get(policy.policy_id) == policy.digest:
                continue
            try:
                head = await ensure_head(
                    policy, self.models, prefix=s.triton.head_model, repo=s.triton.model_repository
                )
            except Exception as e:
                log.error(
                    "policy %s %s failed to compile or load: %s",
                    policy.policy_id,
                    policy.effective_version,
                    e,
                )
                continue
            self.registry.replace(policy.policy_id, head)
            self._policy_digests[policy.policy_id] = policy.digest
            tm.POLICY_VERSION.labels(
                policy.policy_id, policy.effective_version, head.model_version
            ).set(1)
            log.info(
                "policy %s now %s on %s",
                policy.policy_id,
                policy.effective_version,
                head.model_version,
            )


def create_worker(settings: Settings | None = None) -> FastWorker:
    return FastWorker(settings or Settings())
