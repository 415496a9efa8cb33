"""Regressions of the hostile-input and crash findings (issue 11), each against the real broker.

Every input here once was lost, froze the worker or was committed past; now each ends in exactly
one outcome, the worker keeps consuming, and offsets never pass an unfinished record.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from stream_guard.dev.demo import landscape
from stream_guard.dev.stack import s3_client
from tests.conftest import read, upload

pytestmark = pytest.mark.integration


def _publish(bootstrap: str, topic: str, records, partition: int | None = None) -> list[int]:
    """Publish with a producer that accepts big records (8 MB); returns the offsets."""
    from aiokafka import AIOKafkaProducer

    async def run() -> list[int]:
        p = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", max_request_size=8 * 1024 * 1024
        )
        await p.start()
        try:
            out = []
            for key, value in records:
                meta = await p.send_and_wait(topic, value, key=key, partition=partition)
                out.append(meta.offset)
            return out
        finally:
            await p.stop()

    return asyncio.run(run())


def _committed(bootstrap: str, group: str, topic: str, partition: int) -> int | None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> int | None:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await c.start()
        try:
            return await c.committed(TopicPartition(topic, partition))
        finally:
            await c.stop()

    return asyncio.run(run())


def _hostile() -> dict[str, tuple[bytes, str]]:
    caption = b'{"upload_id": "%s", "text": {"caption": "%s"}}'
    big = "x" * 1_000_000
    return {
        "nested": (b"[" * 100_000, "event.malformed"),
        "nested-metadata": (
            b'{"upload_id": "h-nm", "metadata": ' + b"[" * 100_000 + b"}",
            "event.malformed",
        ),
        "invalid-utf8": (caption % (b"h-utf8", b"caf\xff\xfe"), "event.malformed"),
        "lone-surrogate": (caption % (b"h-sur", b"x \\ud800 y"), "event.malformed"),
        "over-1.2MB": (caption % (b"h-12", (big + "y" * 200_000).encode()), "event.too_large"),
        "over-2MB": (caption % (b"h-2", (big * 2).encode()), "event.too_large"),
        "over-5MB": (caption % (b"h-5", (big * 5).encode()), "event.too_large"),
        "wrong-type": (b'{"upload_id": ["a"], "text": 5}', "event.malformed"),
        "newer-schema": (b'{"schema_version": 7, "upload_id": "h-s"}', "event.unsupported_schema"),
    }


def test_hostile_events_each_get_one_bounded_dead_letter_and_valid_ones_still_flow(
    stack, topics, worker_env, start_worker
):
    _, port = start_worker(worker_env)
    hostile = _hostile()
    records = []
    for n, (name, (value, _)) in enumerate(hostile.items()):
        records.append((f"bad-{name}".encode(), value))
        records.append((f"ok-{n}".encode(), upload(f"ok-{n}", f"lunch with friends {n}")))
    records.append((b"tombstone", None))
    _publish(stack.bootstrap, topics.uploads, records)

    dlq = read(stack.bootstrap, topics.dlq, len(hostile) + 1, timeout=120, settle=2)
    verdicts = read(stack.bootstrap, topics.verdicts, len(hostile), timeout=120, settle=1)
    by_key: dict[bytes, list[dict]] = {}
    for r in dlq:
        assert len(r.value) < 1_000_000, "a dead letter always fits a Kafka request"
        by_key.setdefault(r.key, []).append(json.loads(r.value))
    for name, (_, code) in hostile.items():
        letters = by_key.get(f"bad-{name}".encode(), [])
        assert [d["error_code"] for d in letters] == [code], name
        if len(hostile[name][0]) > 256 * 1024:
            assert letters[0]["original_truncated"] is True
            assert letters[0]["original_size"] == len(hostile[name][0])
    assert [d["error_code"] for d in by_key[b"tombstone"]] == ["event.malformed"]
    assert {r.key for r in verdicts} == {f"ok-{n}".encode() for n in range(len(hostile))}
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200


def test_a_worker_killed_while_an_earlier_batch_retries_never_commits_past_it(
    stack, topics, worker_env, start_worker
):
    """The commit-gap case: an upload whose bucket is missing (transient: it waits) holds its
    partition's commits while later batches of the same partition finish; after SIGKILL and
    the bucket's return, it is redelivered and decided."""
    s3 = s3_client(stack.s3_endpoint)
    bucket = f"late{topics.group[1:]}"
    env = {**worker_env, "STREAM_GUARD_S3__ALLOWED_BUCKETS": json.dumps(["uploads", bucket])}
    proc, _ = start_worker(env)
    (stuck_offset,) = _publish(
        stack.bootstrap,
        topics.uploads,
        [(b"stuck", upload("stuck", "our trip", images=[f"s3://{bucket}/a.jpg"]))],
        partition=0,
    )
    time.sleep(2.0)  # the stuck upload is in its own batch, retrying
    later = [(f"later-{n}".encode(), upload(f"later-{n}", f"photo {n}")) for n in range(6)]
    for rec in later:  # separate batches
        _publish(stack.bootstrap, topics.uploads, [rec], partition=0)
        time.sleep(0.3)
    got = read(stack.bootstrap, topics.verdicts, len(later), timeout=90)
    assert {r.key for r in got} == {k for k, _ in later}, "later batches of the partition finish"
    time.sleep(2.0)  # several commit intervals
    committed = _committed(stack.bootstrap, topics.group, topics.uploads, 0)
    assert committed is None or committed <= stuck_offset, (committed, stuck_offset)

    popen = getattr(proc, "popen", proc)
    popen.send_signal(signal.SIGKILL)
    popen.wait(10)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="a.jpg", Body=landscape(0))
    start_worker(env)
    verdicts = read(stack.bootstrap, topics.verdicts, len(later) + 1, timeout=120, settle=1)
    assert b"stuck" in {r.key for r in verdicts}, "the stuck upload was redelivered and decided"
    assert not read(stack.bootstrap, topics.dlq, 0, timeout=2), "nothing dead-lettered"


def test_a_record_waiting_for_its_bucket_does_not_hold_the_rest_of_its_batch(
    stack, topics, worker_env, start_worker
):
    """One in-flight slot, an upload whose bucket does not exist yet (transient) batched with
    six others: the six are decided while it waits, it is decided once its bucket appears, one
    verdict each, nothing dead-lettered, and the commit never passed it meanwhile."""
    s3 = s3_client(stack.s3_endpoint)
    bucket = f"later{topics.group[1:]}"
    env = {
        **worker_env,
        "STREAM_GUARD_S3__ALLOWED_BUCKETS": json.dumps(["uploads", bucket]),
        "STREAM_GUARD_BATCH__MAX_IN_FLIGHT": "1",
        "STREAM_GUARD_BATCH__STALL_AFTER_S": "3",
        # Retries of the waiting record further apart than the readiness probe (every 2 s),
        # which finds the store itself reachable and must not clear what the record waits on.
        "STREAM_GUARD_RETRY__MAX_BACKOFF_S": "4",
        # The worker is stopped for a moment below: no rebalance meanwhile on a slow runner.
        "STREAM_GUARD_KAFKA__SESSION_TIMEOUT_S": "10",
        "STREAM_GUARD_KAFKA__HEARTBEAT_INTERVAL_S": "1",
    }
    worker, port = start_worker(env)
    others = [(f"with-{n}".encode(), upload(f"with-{n}", f"photo {n}")) for n in range(6)]
    stuck = (b"waits", upload("waits", "our trip", images=[f"s3://{bucket}/a.jpg"]))
    (stuck_offset, *_) = _publish(stack.bootstrap, topics.uploads, [stuck, *others], partition=0)
    got = read(stack.bootstrap, topics.verdicts, len(others), timeout=60, settle=2)
    assert {r.key for r in got} == {k for k, _ in others}, "the rest of the batch is decided"
    committed = _committed(stack.bootstrap, topics.group, topics.uploads, 0)
    assert committed is None or committed <= stuck_offset, (committed, stuck_offset)

    # Past the stall bound, with the store answering its probe: waiting for S3, not wedged.
    time.sleep(5)
    base = f"http://127.0.0.1:{port}"
    for _ in range(10):  # across several probe rounds
        assert httpx.get(f"{base}/healthz").status_code == 200
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["failing"] == ["s3"], ready.text
        time.sleep(0.5)

    # The bucket and its object appear together for the worker: a retry between the two
    # would find the key missing (permanent, as it should be) and dead-letter the upload.
    os.kill(worker.popen.pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)  # a GET already sent is answered before the bucket exists
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="a.jpg", Body=landscape(0))
    finally:
        os.kill(worker.popen.pid, signal.SIGCONT)
    verdicts = read(stack.bootstrap, topics.verdicts, len(others) + 1, timeout=90, settle=2)
    keys = [r.key for r in verdicts]
    assert sorted(keys) == sorted([b"waits", *(k for k, _ in others)]), "one verdict each"
    assert not read(stack.bootstrap, topics.dlq, 0, timeout=2), "nothing dead-lettered"
    assert httpx.get(f"{base}/readyz").status_code == 200, "ready again once it finished"


def test_a_read_only_worker_serves_only_a_head_compiled_from_its_exact_policy(
    stack, topics, worker_env, start_worker, tmp_path
):
    """Without repository access the worker trusts Triton's head only after checking the
    version's policy metadata: a reordered policy with the same category count is refused."""
    import yaml

    from stream_guard.settings import DEFAULT_POLICY

    env = {k: v for k, v in worker_env.items() if k != "STREAM_GUARD_TRITON__MODEL_REPOSITORY"}
    start_worker(env)
    _publish(stack.bootstrap, topics.uploads, [(b"ro-1", upload("ro-1", "garden party"))])
    assert {r.key for r in read(stack.bootstrap, topics.verdicts, 1, timeout=60)} == {b"ro-1"}

    data = yaml.safe_load(DEFAULT_POLICY.read_text())
    data["categories"][0], data["categories"][1] = data["categories"][1], data["categories"][0]
    data.pop("pack", None)
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text(yaml.safe_dump(data))
    proc, _ = start_worker({**env, "STREAM_GUARD_POLICY__PATH": str(swapped)}, wait_ready=False)
    popen = getattr(proc, "popen", proc)
    assert popen.wait(120) != 0, "a worker whose policy no served head matches does not start"
