"""Session fixtures: one real local stack (Tansu, moto, tritonserver) shared by integration tests.

Every test gets its own topics and consumer group (``topics`` fixture), so tests never see each
other's records. Workers run as real child processes (`stream-guard serve`), killable like in
production.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".stream-guard" / "test"


@pytest.fixture(scope="session")
def stack():
    from stream_guard.dev.stack import LocalStack

    s = LocalStack(state=STATE)
    with s.running():
        yield s


@dataclass(frozen=True)
class Topics:
    uploads: str
    verdicts: str
    escalations: str
    review: str
    dlq: str
    group: str

    def env(self) -> dict[str, str]:
        return {
            "STREAM_GUARD_KAFKA__TOPICS__UPLOADS": self.uploads,
            "STREAM_GUARD_KAFKA__TOPICS__VERDICTS": self.verdicts,
            "STREAM_GUARD_KAFKA__TOPICS__ESCALATIONS": self.escalations,
            "STREAM_GUARD_KAFKA__TOPICS__REVIEW": self.review,
            "STREAM_GUARD_KAFKA__TOPICS__DLQ": self.dlq,
            "STREAM_GUARD_KAFKA__CONSUMER_GROUP": self.group,
            "STREAM_GUARD_KAFKA__REASONING_GROUP": self.group + "-reasoning",
        }


@pytest.fixture
def topics(stack) -> Topics:
    tag = uuid.uuid4().hex[:8]
    t = Topics(
        *(f"t{tag}.{n}" for n in ("uploads", "verdicts", "escalations", "review", "dlq")),
        group=f"g{tag}",
    )
    stack.create_topics([t.uploads, t.verdicts, t.escalations, t.review, t.dlq])
    return t


@pytest.fixture
def worker_env(stack, topics) -> dict[str, str]:
    return {
        **stack.env(),
        **topics.env(),
        "STREAM_GUARD_BATCH__WINDOW_S": "0.05",
        "STREAM_GUARD_RETRY__MAX_BACKOFF_S": "1.0",
    }


@pytest.fixture
def start_worker(stack) -> Iterator:
    """Factory: start a `stream-guard serve|reason` child process; all are stopped at teardown."""
    from stream_guard.dev.stack import start_worker as _start

    started = []

    def factory(env: dict[str, str], kind: str = "serve", wait_ready: bool = True):
        proc, port = _start(kind, env, STATE / "workers", wait_ready=wait_ready)
        started.append(proc)
        return proc, port

    yield factory
    for proc in started:
        proc.kill()


@pytest.fixture
def s3(stack):
    from stream_guard.dev.stack import s3_client

    return s3_client(stack.s3_endpoint)


def publish(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes | None, bytes]],
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    from aiokafka import AIOKafkaProducer

    async def run() -> None:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await p.start()
        try:
            for key, value in records:
                await p.send_and_wait(topic, value, key=key, headers=headers)
        finally:
            await p.stop()

    asyncio.run(run())


def read(
    bootstrap: str, topic: str, count: int, timeout: float = 60.0, settle: float = 0.0
) -> list:
    """Read at least ``count`` records (then ``settle`` more seconds) from the beginning."""
    from aiokafka import AIOKafkaConsumer

    async def run() -> list:
        c = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            group_id=None,
            enable_auto_commit=False,
        )
        await c.start()
        out: list = []
        extra = settle
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                batch = await c.getmany(timeout_ms=300)
                for msgs in batch.values():
                    out.extend(msgs)
                if len(out) >= count:
                    if extra <= 0:
                        break
                    deadline = min(deadline, time.monotonic() + extra)
                    extra = 0
        finally:
            await c.stop()
        return out

    return asyncio.run(run())


def upload(
    upload_id: str, caption: str | None = None, images: list[str] | None = None, **extra
) -> bytes:
    event = {
        "upload_id": upload_id,
        "text": {"caption": caption},
        "images": [{"uri": u} for u in (images or [])],
        **extra,
    }
    return json.dumps(event).encode()


@pytest.fixture(scope="session", autouse=True)
def _quiet_env():
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture
def escalate_all_policy(tmp_path: Path) -> Path:
    """The default policy under another id, with a band covering every score: all escalate."""
    import yaml

    from stream_guard.settings import DEFAULT_POLICY

    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    data["policy_id"] = "escalate_all"
    data.pop("pack", None)  # its band makes every score escalate: nothing to calibrate
    data["thresholds"] = {"allow": 0.0, "block": 1.0}
    for cat in data["categories"]:
        cat.pop("thresholds", None)
    path = tmp_path / "escalate_all.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
