"""`stream-guard demo`: the whole product on this machine in one command.

Starts the real local stack (Tansu, moto, tritonserver, and llama.cpp for the reasoning tier),
runs the workers as child processes, publishes a handful of sample uploads (safe, threatening,
self-harm, multi-image, a veiled threat and a stalking request the fast tier blocks, a veiled
farewell it is unsure of and escalates to the reasoning tier, a corrupt image, a missing
object), prints every verdict and dead letter as it arrives, then stops everything.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stream_guard.dev.stack import STATE_DIR, LocalStack, s3_client, start_worker
from stream_guard.settings import Settings

__all__ = [
    "Sample",
    "landscape",
    "run_demo",
    "samples",
    "upload_event",
]


@dataclass
class Sample:
    upload_id: str
    caption: str
    images: list[bytes] = field(default_factory=list)
    missing: bool = False
    content_type: str = "image/jpeg"


def landscape(seed: int = 0, size: tuple[int, int] = (640, 400)) -> bytes:
    """A synthetic sunset-over-hills photo: sky gradient, sun, hills, a little noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y = np.linspace(0, 1, h)[:, None]
    sky = np.stack([255 - 60 * y, 140 + 60 * y, 90 + 140 * y], axis=-1) * np.ones((1, w, 1))
    img = Image.fromarray(np.clip(sky + rng.normal(0, 4, sky.shape), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.6, h * 0.15, w * 0.75, h * 0.38], fill=(255, 210, 120))
    d.polygon(
        [(0, h), (0, h * 0.6), (w * 0.3, h * 0.45), (w * 0.7, h * 0.65), (w, h * 0.5), (w, h)],
        fill=(40 + seed * 10, 110, 50),
    )
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def samples() -> list[Sample]:
    corrupt = landscape(3)[:1500]  # a JPEG cut off mid-scan
    return [
        Sample("demo-sunset", "Sunset over the hills on our hike today", [landscape(0)]),
        Sample(
            "demo-threat", "I know where you live. I am going to kill you and your family tonight."
        ),
        Sample("demo-self-harm", "I can't do this anymore, tonight I'm going to end my life."),
        Sample(
            "demo-trip",
            "Photos from our family trip, the kids loved it",
            [landscape(1), landscape(2)],
        ),
        Sample("demo-veiled", "he better watch himself walking home tonight"),
        Sample(
            "demo-stalking",
            "is there a way to see someone's private instagram without them knowing",
        ),
        Sample(
            "demo-farewell",
            "I've been giving my pills away lately, won't need them where I'm going",
        ),
        Sample("demo-corrupt", "my new profile picture", [corrupt]),
        Sample("demo-missing", "look at this", missing=True),
    ]


def upload_event(sample: Sample, bucket: str) -> dict:
    images = [
        {
            "uri": f"s3://{bucket}/demo/{sample.upload_id}/{n}.jpg",
            "content_type": sample.content_type,
        }
        for n in range(len(sample.images))
    ]
    if sample.missing:
        images = [{"uri": f"s3://{bucket}/demo/{sample.upload_id}/never-uploaded.jpg"}]
    return {"upload_id": sample.upload_id, "images": images, "text": {"caption": sample.caption}}


async def _publish_and_collect(
    stack: LocalStack,
    settings: Settings,
    items: list[Sample],
    expect_reasoning: bool,
    timeout: float,
) -> dict[str, list[dict]]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    t = settings.kafka.topics
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
    await producer.start()
    for s in items:
        event = upload_event(s, stack.bucket)
        await producer.send_and_wait(
            t.uploads, json.dumps(event).encode(), key=s.upload_id.encode()
        )
    await producer.stop()
    consumer = AIOKafkaConsumer(
        t.verdicts,
        t.dlq,
        t.review,
        bootstrap_servers=stack.bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    seen: dict[str, list[dict]] = {s.upload_id: [] for s in items}
    deadline = time.monotonic() + timeout

    def done(uid: str) -> bool:
        recs = seen[uid]
        if any(r["_topic"] in (t.dlq, t.review) for r in recs):
            return True
        finals = [r for r in recs if r.get("final")]
        escalated = any(r.get("decision") == "escalate" for r in recs)
        return bool(finals) and (not escalated or not expect_reasoning or len(finals) >= 1)

    try:
        while time.monotonic() < deadline and not all(done(u) for u in seen):
            batch = await consumer.getmany(timeout_ms=500)
            for tp, msgs in batch.items():
                for m in msgs:
                    uid = (m.key or b"").decode()
                    if uid in seen:
                        rec = json.loads(m.value)
                        rec["_topic"] = tp.topic
                        seen[uid].append(rec)
                        _print_record(uid, rec, t)
    finally:
        await consumer.stop()
    return seen


def _print_record(uid: str, rec: dict, topics) -> None:
    if rec["_topic"] == topics.dlq:
        print(f"  {uid:<18} DEAD LETTER  {rec['error_code']}: {rec['reason']}")
        return
    top = sorted(rec["categories"], key=lambda c: c["score"], reverse=True)[:3]
    scores = ", ".join(f"{c['code']} {c['name']} {c['score']:.2f}" for c in top)
    kind = "final" if rec["final"] else "provisional"
    if rec["_topic"] == topics.review:
        kind = f"to {topics.review}"
    print(f"  {uid:<18} {rec['decision'].upper():<9} ({rec['mode']}, {kind}) top: {scores}")
    if rec.get("review_reason"):
        print(f"  {'':<18} review reason: {rec['review_reason'][:160]}")
    if rec.get("reasoning"):
        r = rec["reasoning"]
        print(
            f"  {'':<18} reasoning [{r['model']}, {r['trust']}]: {r['decision']} "
            f"{r['categories']} - {r['rationale'][:160]!r}"
        )


def run_demo(*, with_reasoning: bool = True, state: Path | None = None) -> int:
    """The demo; Ctrl-C, SIGTERM or SIGHUP stop it and everything it started."""
    from stream_guard.dev.signals import Interrupted, stop_on_signals

    with stop_on_signals():
        try:
            return _run_demo(with_reasoning, state or STATE_DIR / "demo")
        except Interrupted as e:
            print(f"\n{e.signame}: stopping the demo and its stack", flush=True)
            return 128 + e.signum


def _run_demo(with_reasoning: bool, state: Path) -> int:
    if with_reasoning:
        try:
            from stream_guard.agents import reasoning  # noqa: F401
            from stream_guard.reasoning import server  # noqa: F401
        except ImportError:
            print("reasoning tier not available in this build; running fast mode only")
            with_reasoning = False
    stack = LocalStack(state=state, with_reasoning=with_reasoning)
    print(
        f"starting the local stack in {state} (broker, S3, Triton"
        f"{', llama.cpp' if with_reasoning else ''}) ...",
        flush=True,
    )
    t0 = time.monotonic()
    workers = []
    with stack.running():
        settings = Settings()
        t = settings.kafka.topics
        stack.create_topics([t.uploads, t.verdicts, t.escalations, t.review, t.dlq])
        print(f"stack up in {time.monotonic() - t0:.0f}s; starting workers ...", flush=True)
        env = stack.env()
        workers.append(start_worker("serve", env, state)[0])
        if with_reasoning:
            workers.append(start_worker("reason", env, state)[0])
        items = samples()
        s3 = s3_client(stack.s3_endpoint)
        for s in items:
            for n, data in enumerate(s.images):
                s3.put_object(
                    Bucket=stack.bucket,
                    Key=f"demo/{s.upload_id}/{n}.jpg",
                    Body=data,
                    ContentType=s.content_type,
                )
        print(
            f"publishing {len(items)} uploads to {t.uploads}; verdicts as they arrive:", flush=True
        )
        try:
            seen = asyncio.run(_publish_and_collect(stack, settings, items, with_reasoning, 240))
        finally:
            for w in workers:
                w.stop(timeout=30)
    missing = [u for u, recs in seen.items() if not recs]
    print(
        f"\n{len(items) - len(missing)}/{len(items)} uploads answered; "
        f"logs in {state}. Stack stopped."
    )
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(run_demo())
