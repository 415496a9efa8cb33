"""The review console: a small web service where people settle the uploads in ``guard.review``.

It follows three topics into a :class:`~stream_guard.review.queue.ReviewQueue`, serves one page
(``static/``) and a JSON API, fetches an item's images from S3 itself (the browser never talks to
the bucket) and publishes each decision as a ReviewDecision, keyed by upload id, acknowledged by
the broker before the page hears "done".

Who decided: the identity an authenticating proxy in front of the console puts in
``review.reviewer_header``; without that header (local use), the name the page sends. Either way
only an opaque digest of it goes into events. State-changing requests must carry a JSON body and
the ``X-Review-Console`` header, which a cross-site form or image cannot send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter, Gauge, generate_latest
from pydantic import ValidationError

from stream_guard import observability as obs
from stream_guard.errors import DependencyUnavailable, MediaError
from stream_guard.events import Escalation, ReviewDecision, Verdict
from stream_guard.media.storage import ObjectStore
from stream_guard.review.broker import reader, writer
from stream_guard.review.decisions import opaque_reviewer
from stream_guard.review.images import render_for_review
from stream_guard.review.policies import PolicyBook
from stream_guard.review.queue import ReviewQueue
from stream_guard.review.views import item_view, queue_view
from stream_guard.settings import Settings

__all__ = ["CSRF_HEADER", "ReviewConsole", "run_console"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {"console.js": "text/javascript", "console.css": "text/css"}
CSRF_HEADER = "X-Review-Console"
MAX_BODY_BYTES = 64 * 1024
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

PENDING = Gauge("stream_guard_review_queue_pending", "Uploads waiting for a person")
DECIDED = Counter(
    "stream_guard_review_console_decisions_total", "Decisions published", ["decision"]
)
IGNORED = Counter(
    "stream_guard_review_console_ignored_total", "Records the console could not read", ["topic"]
)


class ReviewConsole:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = settings.kafka.topics
        self.queue = ReviewQueue(settings.review.queue_index)
        self.policies = PolicyBook(settings)
        self.store = ObjectStore(settings.s3)
        self.producer: AIOKafkaProducer | None = None  # made in start(): it needs the loop
        self.caught_up = False
        self.settled_here = 0
        self._deciding: set[str] = set()
        self._follower: asyncio.Task | None = None
        self._refresher: asyncio.Task | None = None

    # -- following the topics --------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.policies.refresh)
        self.producer = writer(self.settings.kafka)
        await self.producer.start()
        self._follower = asyncio.ensure_future(self._follow())
        self._refresher = asyncio.ensure_future(self._refresh_policies())

    async def stop(self) -> None:
        for task in (self._follower, self._refresher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.producer is not None:
            await self.producer.stop()
        self.store.close()

    async def _follow(self) -> None:
        t = self.topics
        consumer = reader(self.settings.kafka, [t.escalations, t.review, t.review_decisions])
        await consumer.start()
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=500, max_records=500)
                for records in batch.values():
                    for r in records:
                        self.apply(r.topic, r.value)
                self.caught_up = self.caught_up or await _at_end(consumer)
                PENDING.set(len(self.queue))
        finally:
            await consumer.stop()

    def apply(self, topic: str, value: bytes | None) -> None:
        """One record of a followed topic; unreadable ones are counted and skipped (the workers
        that own those topics dead-letter bad input, the console only reads)."""
        t = self.topics
        try:
            if topic == t.escalations:
                self.queue.add_escalation(Escalation.model_validate_json(value or b""))
            elif topic == t.review:
                self.queue.add_review(Verdict.model_validate_json(value or b""))
            elif topic == t.review_decisions:
                d = ReviewDecision.model_validate_json(value or b"")
                self.queue.settle(d.upload_id, d.decision_id)
        except (ValidationError, ValueError, RecursionError) as e:
            IGNORED.labels(topic).inc()
            log.warning("review console skipped a record of %s: %s", topic, str(e)[:300])

    # -- the API -------------------------------------------------------------------------------

    async def queue_page(self, request: web.Request) -> web.Response:
        items = self.queue.pending()
        return web.json_response(
            queue_view(items, settled=self.settled_here, caught_up=self.caught_up)
        )

    async def item_page(self, request: web.Request) -> web.Response:
        item = self.queue.item(request.match_info["upload_id"])
        if item is None:
            return _error(404, "not in the queue (settled, or never sent to review)")
        v = item.verdict
        return web.json_response(item_view(item, self.policies.get(v.policy_id, v.policy_version)))

    async def image(self, request: web.Request) -> web.Response:
        item = self.queue.item(request.match_info["upload_id"])
        n = int(request.match_info["n"])
        if item is None or item.upload is None or n >= len(item.upload.images):
            return _error(404, "no such image in the queue")
        ref = item.upload.images[n]
        s = self.settings
        try:
            obj = await self.store.fetch(ref)
            loop = asyncio.get_running_loop()
            jpeg = await loop.run_in_executor(
                None,
                render_for_review,
                obj.data,
                ref.content_type or obj.content_type,
                s.media,
                s.s3.max_object_bytes,
                s.review.image_max_side,
            )
        except MediaError as e:
            return _error(422, f"{e.code}: {e.reason}")
        except DependencyUnavailable as e:
            return _error(503, str(e))
        return web.Response(body=jpeg, content_type="image/jpeg")

    async def decide(self, request: web.Request) -> web.Response:
        if request.headers.get(CSRF_HEADER) != "1" or request.content_type != "application/json":
            return _error(403, f"send JSON with the {CSRF_HEADER}: 1 header")
        upload_id = request.match_info["upload_id"]
        item = self.queue.item(upload_id)
        if item is None or upload_id in self._deciding:
            settled = self.queue.is_settled(upload_id) or upload_id in self._deciding
            return _error(409 if settled else 404, "already settled" if settled else "not queued")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("note") or "", str):
            return _error(400, "send a JSON object: decision, categories, note (a string)")
        identity = request.headers.get(self.settings.review.reviewer_header)
        if identity is None and not self.settings.review.require_reviewer_header:
            identity = body.get("reviewer")  # local use: the name typed into the page
        if not isinstance(identity, str) or not identity.strip():
            return _error(401, "who is deciding? (no reviewer identity in the request)")
        try:
            decision = self._decision(item, body, opaque_reviewer(identity))
        except ValidationError as e:
            return _error(422, "; ".join(err["msg"] for err in e.errors()[:3]))
        if self.producer is None:
            return _error(503, "the console is starting; try again")
        self._deciding.add(upload_id)
        try:
            await asyncio.wait_for(
                self.producer.send_and_wait(
                    self.topics.review_decisions, decision.to_bytes(), key=upload_id.encode()
                ),
                20.0,
            )
        except Exception as e:  # the broker did not acknowledge: nothing is settled
            log.warning("decision for %s not published: %r", upload_id, e)
            return _error(503, "the decision could not be published; try again")
        finally:
            self._deciding.discard(upload_id)
        self.queue.settle(upload_id, decision.decision_id)
        self.settled_here += 1
        DECIDED.labels(str(decision.decision)).inc()
        PENDING.set(len(self.queue))
        return web.json_response({"decision_id": decision.decision_id, "upload_id": upload_id})

    @staticmethod
    def _decision(item: Any, body: dict[str, Any], reviewer: str) -> ReviewDecision:
        v = item.verdict
        return ReviewDecision.model_validate(
            {
                "decision_id": uuid.uuid4().hex,
                "upload_id": v.upload_id,
                "tenant_id": v.tenant_id,
                "verdict_id": v.verdict_id,
                "policy_id": v.policy_id,
                "policy_version": v.policy_version,
                "decision": body.get("decision"),
                "categories": body.get("categories") or [],
                "reviewer": reviewer,
                "decided_at": datetime.now(UTC),
                "note": (body.get("note") or "").strip() or None,
                "reviewed": v,
                "upload": item.upload,
            }
        )

    # -- the service -----------------------------------------------------------------------

    def web_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_security_headers])
        app.router.add_get("/", _page)
        app.router.add_get("/static/{name}", _static)
        app.router.add_get("/api/queue", self.queue_page)
        app.router.add_get("/api/items/{upload_id}", self.item_page)
        app.router.add_get(r"/api/items/{upload_id}/images/{n:\d{1,2}}", self.image)
        app.router.add_post("/api/items/{upload_id}/decision", self.decide)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", _metrics)
        app.on_startup.append(lambda _: self.start())
        app.on_cleanup.append(lambda _: self.stop())
        return app

    async def _refresh_policies(self) -> None:
        while True:
            await asyncio.sleep(self.settings.policy.reload_interval_s)
            await asyncio.get_running_loop().run_in_executor(None, self.policies.refresh)

    async def _healthz(self, request: web.Request) -> web.Response:
        alive = self._follower is not None and not self._follower.done()
        status = 200 if alive else 503
        return web.json_response({"status": "alive" if alive else "stopped"}, status=status)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.caught_up and self._follower is not None and not self._follower.done()
        status = 200 if ready else 503
        return web.json_response({"ready": ready, "pending": len(self.queue)}, status=status)


async def _at_end(consumer: Any) -> bool:
    """Every assigned partition read up to the high watermark of its last fetch."""
    assignment = consumer.assignment()
    if not assignment:
        return False
    for tp in assignment:
        high = consumer.highwater(tp)
        if high is None or await consumer.position(tp) < high:
            return False
    return True


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _security_headers(request: web.Request, handler: Any) -> web.StreamResponse:
    response = await handler(request)
    response.headers.update(SECURITY_HEADERS)
    return response


async def _page(request: web.Request) -> web.Response:
    return web.Response(body=(STATIC / "index.html").read_bytes(), content_type="text/html")


async def _static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in PAGES:
        return _error(404, "no such file")
    return web.Response(body=(STATIC / name).read_bytes(), content_type=PAGES[name])


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": obs.PROM_CONTENT_TYPE})


def run_console(settings: Settings) -> None:
    """Serve until SIGINT / SIGTERM."""
    console = ReviewConsole(settings)
    r = settings.review
    log.info("review console on http://%s:%d", r.console_host, r.console_port)
    web.run_app(
        console.web_app(),
        host=r.console_host,
        port=r.console_port,
        print=None,
        shutdown_timeout=5.0,
    )
