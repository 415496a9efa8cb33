"""Open-loop load against a topic, and the verdicts it produces, matched by upload id.

The producer sends at a fixed rate whatever the consumer side does (open loop: a slow pipeline
cannot slow the offered load down and hide its own latency). Each upload record carries its
send time as its Kafka timestamp; latency is the verdict record's timestamp (set when the worker
produced it) minus the upload record's timestamp, on the same clock (everything runs on this
machine). The consume-time latency (when this harness read the verdict) is kept too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from .stats import latency_summary


@dataclass
class Seen:
    verdict_ts_ms: int
    consumed_at: float
    decision: str
    topic: str


@dataclass
class Collector:
    """Reads verdict (and dead-letter) topics from the beginning for the whole run."""

    bootstrap: str
    topics: list[str]
    seen: dict[str, Seen] = field(default_factory=dict)
    duplicates: int = 0
    _task: asyncio.Task | None = None
    _consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = time.time()
            for tp, msgs in batch.items():
                for m in msgs:
                    uid = (m.key or b"").decode()
                    if uid in self.seen:
                        self.duplicates += 1
                        continue
                    decision = "dlq"
                    if not tp.topic.endswith("dlq"):
                        try:
                            decision = str(json.loads(m.value).get("decision"))
                        except ValueError:
                            decision = "?"
                    self.seen[uid] = Seen(m.timestamp, now, decision, tp.topic)

    async def wait_for(self, ids: list[str], within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if all(i in self.seen for i in ids):
                return True
            await asyncio.sleep(0.1)
        return False

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._consumer:
            await self._consumer.stop()


@dataclass
class Sent:
    upload_id: str
    ts_ms: int
    lag_s: float  # how far behind schedule the producer was when it sent this one


async def produce(
    producer: AIOKafkaProducer,
    topic: str,
    count: int,
    rate: float | None,
    make: Callable[[int], tuple[str, bytes]],
) -> list[Sent]:
    """Send ``count`` records at ``rate``/s (None: as fast as possible, a backlog burst)."""
    sent: list[Sent] = []
    futures = []
    t0 = time.monotonic()
    for k in range(count):
        target = t0 + k / rate if rate else t0
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        uid, value = make(k)
        now = time.time()
        ts = int(now * 1000)
        futures.append(await producer.send(topic, value, key=uid.encode(), timestamp_ms=ts))
        sent.append(Sent(uid, ts, max(time.monotonic() - target, 0.0)))
    await asyncio.gather(*futures)
    return sent


def phase_summary(sent: list[Sent], collector: Collector) -> dict:
    """Delivered rate and latency of one phase, from the records the collector saw."""
    got = [(s, collector.seen[s.upload_id]) for s in sent if s.upload_id in collector.seen]
    if not got:
        return {"sent": len(sent), "answered": 0}
    first_send = min(s.ts_ms for s in sent) / 1000
    last_send = max(s.ts_ms for s in sent) / 1000
    last_verdict = max(v.verdict_ts_ms for _, v in got) / 1000
    latencies = [max(v.verdict_ts_ms - s.ts_ms, 0) / 1000 for s, v in got]
    consume = [max(v.consumed_at - s.ts_ms / 1000, 0.0) for s, v in got]
    decisions: dict[str, int] = {}
    for _, v in got:
        decisions[v.decision] = decisions.get(v.decision, 0) + 1
    verdicts = sum(n for d, n in decisions.items() if d != "dlq")
    span = max(last_verdict - first_send, 1e-3)
    return {
        "sent": len(sent),
        "answered": len(got),
        "offered_per_s": round(len(sent) / max(last_send - first_send, 1e-3), 1)
        if len(sent) > 1
        else None,
        "delivered_per_s": round(len(got) / span, 1),
        "latency": latency_summary(latencies),
        "consume_latency": latency_summary(consume),
        "producer_max_lag_ms": round(max(s.lag_s for s in sent) * 1000, 1),
        "decisions": decisions,
        "escalation_rate": round(decisions.get("escalate", 0) / verdicts, 4) if verdicts else None,
    }
