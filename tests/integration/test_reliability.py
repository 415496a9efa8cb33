"""Outages and shutdown on the real components: Triton, S3 and the broker go away and come back.

Each dependency that is stopped here is a second instance started for the test (a tritonserver
over the shared model repository, a moto server, a Tansu broker on durable ``s3://`` storage),
so the session's shared stack is never harmed. What every test checks is the delivery contract:
while a dependency is down the worker reports not-ready naming it, takes no decision (no
verdict, no dead letter, no committed offset), and once it is back every upload has exactly one
verdict.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from stream_guard.dev.demo import landscape
from stream_guard.dev.stack import (
    ACCESS_KEY,
    SECRET_KEY,
    Process,
    TritonPorts,
    create_topics,
    free_port,
    s3_client,
    start_broker,
    start_s3,
    start_triton,
)
from tests.conftest import STATE, publish, read, upload

pytestmark = pytest.mark.integration


# -- helpers ---------------------------------------------------------------------------------


def _by_key(records) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for r in records:
        out.setdefault(r.key.decode(), []).append(r.value)
    return out


def _readyz(port: int) -> tuple[int, list[str]]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    except httpx.HTTPError:
        return 0, ["<no answer>"]
    return r.status_code, r.json().get("failing", [])


def _wait_for(check: Callable[[], bool], what: str, timeout: float) -> float:
    """Poll ``check`` until true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


def _committed(bootstrap: str, group: str, topic: str, partitions: int = 4) -> int:
    """Sum over partitions of the group's committed offsets on ``topic`` (records acked)."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    async def run() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:  # Tansu answers OffsetFetch only for named partitions
            offsets = await admin.list_consumer_group_offsets(
                group, partitions=[TopicPartition(topic, p) for p in range(partitions)]
            )
        finally:
            await admin.close()
        return sum(max(o.offset, 0) for o in offsets.values())

    return asyncio.run(run())


def _in_flight(port: int) -> float:
    """The worker's stream_guard_in_flight_batches gauge."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    line = next(ln for ln in text.splitlines() if ln.startswith("stream_guard_in_flight_batches "))
    return float(line.split()[1])


def _kill_group(proc: Process) -> None:
    """SIGKILL a child we started and everything in its process group (Triton's stubs)."""
    if proc.popen.poll() is None:
        os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(10)


def _exactly_one_each(records, expected: set[str]) -> None:
    got = _by_key(records)
    assert set(got) == expected, f"missing {sorted(expected - set(got))[:5]}"
    dups = {k: len(v) for k, v in got.items() if len(v) != 1}
    assert not dups, f"uploads with more than one verdict: {dups}"


# -- a tritonserver of our own, over the shared model repository ------------------------------


class Triton:
    def __init__(self, stack) -> None:
        index = httpx.post(f"http://127.0.0.1:{stack.triton.http}/v2/repository/index").json()
        self.models = sorted({m["name"] for m in index if m.get("state") == "READY"})
        self.repo = stack.model_repository
        self.ports = TritonPorts(free_port(), free_port(), free_port())
        self.proc: Process | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def start(self) -> None:
        self.proc = start_triton(STATE / "triton-outage", self.repo, self.ports, self.models)

    def kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)


@pytest.fixture(scope="module")
def own_triton(stack) -> Iterator[Triton]:
    triton = Triton(stack)
    triton.start()
    yield triton
    triton.kill()


# -- a moto server that can die and come back with its objects --------------------------------

# moto keeps objects in memory, so a restarted server has none. This one loads the objects the
# test put before it starts listening: the worker can never see the server up but empty (which
# would be a real "no such key", and a dead letter) - a real S3 keeps its objects.
_SEEDED_MOTO = """
import pathlib, sys, time
import boto3
from moto.server import ThreadedMotoServer
port, bucket, src = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
seed = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
seed.start()
host, seed_port = seed.get_host_and_port()
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{seed_port}", region_name="us-east-1",
                  aws_access_key_id="k", aws_secret_access_key="s")
s3.create_bucket(Bucket=bucket)
for f in sorted(src.iterdir()):
    s3.put_object(Bucket=bucket, Key=f.name.replace("__", "/"), Body=f.read_bytes())
seed.stop()
ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
print("serving", flush=True)
while True:
    time.sleep(3600)
"""


class SeededS3:
    def __init__(self, tmp: Path, bucket: str = "uploads") -> None:
        self.port = free_port()
        self.bucket = bucket
        self.objects = tmp / "objects"
        self.objects.mkdir(parents=True)
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def put(self, key: str, body: bytes) -> None:
        (self.objects / key.replace("/", "__")).write_bytes(body)

    def start(self) -> None:
        log = open(STATE / f"moto-seeded-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SEEDED_MOTO, str(self.port), self.bucket, str(self.objects)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _wait_for(lambda: self._up(), "seeded moto listening", 30)

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError("seeded moto exited; see its log under .stream-guard/test")
        try:
            return httpx.get(f"{self.endpoint}/{self.bucket}", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# -- outages -----------------------------------------------------------------------------------


def test_triton_outage_stops_consumption_and_every_upload_gets_one_verdict_after_restart(
    stack, topics, worker_env, start_worker, s3, own_triton
):
    s3.put_object(Bucket="uploads", Key="outage/hills.jpg", Body=landscape(4))
    env = {
        **worker_env,
        "STREAM_GUARD_TRITON__URL": own_triton.url,
        "STREAM_GUARD_TRITON__TIMEOUT_S": "2",
    }
    _, port = start_worker(env)

    def uploads(prefix: str, n: int) -> list[tuple[bytes, bytes]]:
        return [
            (
                f"{prefix}{i}".encode(),
                upload(
                    f"{prefix}{i}",
                    f"walk number {i} by the river",
                    ["s3://uploads/outage/hills.jpg"] if i % 3 == 0 else [],
                ),
            )
            for i in range(n)
        ]

    publish(stack.bootstrap, topics.uploads, uploads("before-", 8))
    assert len(read(stack.bootstrap, topics.verdicts, 8, timeout=60)) == 8
    _wait_for(
        lambda: _committed(stack.bootstrap, topics.group, topics.uploads) == 8,
        "the 8 decided uploads committed",
        15,
    )

    own_triton.kill()
    down_at = time.monotonic()
    _wait_for(lambda: "triton" in _readyz(port)[1], "readyz names triton", 10)
    # Uploads keep coming during the outage (~20 s): none may be decided, dropped or acked.
    for wave in range(4):
        publish(stack.bootstrap, topics.uploads, uploads(f"during{wave}-", 4))
        time.sleep(4)
        status, failing = _readyz(port)
        assert status == 503 and "triton" in failing, (status, failing)
    time.sleep(max(0.0, 22 - (time.monotonic() - down_at)))  # an outage of at least 22 s
    # A dependency outage is no wedge: the worker stays live (no restart loop), and the lag
    # metric shows the backlog that waits (16 published, none finished), not the fetched 0.
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    lag = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("stream_guard_consumer_lag{")
    )
    assert lag >= 16, f"consumer lag during the outage reads {lag}"
    assert len(read(stack.bootstrap, topics.verdicts, 9, timeout=3)) == 8
    assert read(stack.bootstrap, topics.dlq, 1, timeout=1) == []
    assert _committed(stack.bootstrap, topics.group, topics.uploads) == 8
    assert _readyz(port)[0] == 503

    own_triton.start()  # same ports, same model repository (start() waits for Triton's ready)
    back_at = time.monotonic()
    _wait_for(lambda: _readyz(port)[0] == 200, "ready again after Triton is back", 60)
    # Recovery time, reported (not asserted): the gRPC reconnect backoff is capped at 2 s.
    print(f"worker ready {time.monotonic() - back_at:.1f} s after Triton was ready again")
    expected = {k.decode() for k, _ in uploads("before-", 8)} | {
        k.decode() for w in range(4) for k, _ in uploads(f"during{w}-", 4)
    }
    _exactly_one_each(read(stack.bootstrap, topics.verdicts, 24, timeout=90, settle=2), expected)
    assert read(stack.bootstrap, topics.dlq, 1, timeout=1) == []
    _wait_for(
        lambda: _committed(stack.bootstrap, topics.group, topics.uploads) == 24,
        "everything committed after recovery",
        15,
    )


def test_s3_outage_retries_without_dead_letters_and_recovers(
    stack, topics, worker_env, start_worker, tmp_path
):
    own_s3 = SeededS3(tmp_path)
    for n in range(3):
        own_s3.put(f"s3out/{n}.jpg", landscape(n, (320, 200)))
    own_s3.start()
    try:
        env = {
            **worker_env,
            "STREAM_GUARD_S3__ENDPOINT_URL": own_s3.endpoint,
            "STREAM_GUARD_S3__TIMEOUT_S": "2",
        }
        _, port = start_worker(env)
        first = [
            (f"s3a{n}".encode(), upload(f"s3a{n}", "our trip", [f"s3://uploads/s3out/{n}.jpg"]))
            for n in range(3)
        ]
        publish(stack.bootstrap, topics.uploads, first)
        assert len(read(stack.bootstrap, topics.verdicts, 3, timeout=60)) == 3

        own_s3.kill()
        _wait_for(lambda: "s3" in _readyz(port)[1], "readyz names s3", 15)
        during = [
            (
                f"s3b{n}".encode(),
                upload(f"s3b{n}", "more photos", [f"s3://uploads/s3out/{n % 3}.jpg"]),
            )
            for n in range(6)
        ]
        publish(stack.bootstrap, topics.uploads, during)
        time.sleep(6)  # several retry rounds against a dead S3
        status, failing = _readyz(port)
        assert status == 503 and "s3" in failing, (status, failing)
        assert len(read(stack.bootstrap, topics.verdicts, 4, timeout=3)) == 3
        assert read(stack.bootstrap, topics.dlq, 1, timeout=1) == []  # no media.* dead letter
        assert _committed(stack.bootstrap, topics.group, topics.uploads) == 3

        own_s3.start()  # a new server process, with the same objects
        _wait_for(lambda: _readyz(port)[0] == 200, "ready again after S3 is back", 30)
        _exactly_one_each(
            read(stack.bootstrap, topics.verdicts, 9, timeout=60, settle=2),
            {k.decode() for k, _ in first + during},
        )
        assert read(stack.bootstrap, topics.dlq, 1, timeout=1) == []
    finally:
        own_s3.kill()


@pytest.fixture
def durable_broker(tmp_path) -> Iterator[Callable[[], None]]:
    """Tansu on ``s3://`` storage (its own moto); yields a restart function."""
    state = STATE / "durable-broker"
    s3_port, port = free_port(), free_port()
    moto = start_s3(state, s3_port)
    s3_client(f"http://127.0.0.1:{s3_port}").create_bucket(Bucket="tansu")
    env = {
        "AWS_ENDPOINT": f"http://127.0.0.1:{s3_port}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
    }
    procs = [start_broker(state, port, storage="s3://tansu/", env=env)]

    def restart(down_s: float = 0.0, while_down: Callable[[], None] | None = None) -> None:
        procs[-1].kill()  # SIGKILL: nothing is flushed on the way out
        if while_down:
            while_down()
        time.sleep(down_s)
        procs.append(start_broker(state, port, storage="s3://tansu/", env=env))

    restart.bootstrap = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield restart
    procs[-1].stop()
    moto.stop()


def test_broker_restart_on_durable_storage_keeps_every_upload(
    stack, topics, worker_env, start_worker, durable_broker
):
    bootstrap = durable_broker.bootstrap
    asyncio.run(
        create_topics(
            bootstrap,
            [topics.uploads, topics.verdicts, topics.escalations, topics.review, topics.dlq],
            4,
        )
    )
    env = {**worker_env, "STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS": bootstrap}
    proc, port = start_worker(env)

    def batch(prefix: str, n: int = 10) -> list[tuple[bytes, bytes]]:
        return [
            (f"{prefix}{i}".encode(), upload(f"{prefix}{i}", f"picnic photo {i}")) for i in range(n)
        ]

    a, b, c = batch("a"), batch("b"), batch("c")
    publish(bootstrap, topics.uploads, a)
    assert len(read(bootstrap, topics.verdicts, 10, timeout=60)) == 10

    # The broker dies under a running worker: not ready (naming kafka), then back by itself.
    def broker_is_down() -> None:
        _wait_for(lambda: "kafka" in _readyz(port)[1], "readyz names kafka", 10)
        assert _readyz(port)[0] == 503

    durable_broker(down_s=2, while_down=broker_is_down)
    _wait_for(lambda: _readyz(port)[0] == 200, "ready again after the broker is back", 60)
    publish(bootstrap, topics.uploads, b)
    assert len(read(bootstrap, topics.verdicts, 20, timeout=90)) >= 20

    # Uploads published while no worker runs, then a broker restart: all survive on storage.
    proc.stop()
    publish(bootstrap, topics.uploads, c)
    durable_broker()
    start_worker(env)
    verdicts = read(bootstrap, topics.verdicts, 30, timeout=90, settle=3)
    got = _by_key(verdicts)
    assert set(got) == {k.decode() for k, _ in a + b + c}
    assert all(len(set(v)) == 1 for v in got.values()), "a redelivered verdict differs"
    assert read(bootstrap, topics.dlq, 1, timeout=1) == []


# -- graceful shutdown -------------------------------------------------------------------------


def _image_uploads(s3, n: int, prefix: str) -> list[tuple[bytes, bytes]]:
    s3.put_object(Bucket="uploads", Key="shutdown/photo.jpg", Body=landscape(5))
    images = ["s3://uploads/shutdown/photo.jpg"] * 2
    return [
        (f"{prefix}{i}".encode(), upload(f"{prefix}{i}", f"holiday album page {i}", images))
        for i in range(n)
    ]


def _sigterm(proc: Process, grace: float) -> float:
    start = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    try:
        proc.popen.wait(grace + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker still running {grace + 30:.0f}s after SIGTERM")
    took = time.monotonic() - start
    print(f"worker exited {took:.1f}s after SIGTERM (grace {grace:.0f}s)")
    return took


def test_sigterm_finishes_in_flight_batches_within_the_grace_period_and_commits_them(
    stack, topics, worker_env, start_worker, s3
):
    # Small batches, so that the ones in flight finish well within the grace period even on a
    # loaded 2-core machine (the deadline itself is the next test's subject).
    grace = 12.0
    env = {
        **worker_env,
        "STREAM_GUARD_SHUTDOWN_GRACE_S": str(grace),
        "STREAM_GUARD_BATCH__MAX_SIZE": "4",
    }
    events = _image_uploads(s3, 64, "sd")
    publish(stack.bootstrap, topics.uploads, events)
    proc, port = start_worker(env)
    _wait_for(lambda: _in_flight(port) > 0, "batches in flight", 60)
    took = _sigterm(proc, grace)
    log = proc.log_path.read_text()
    assert "draining" in log and "in-flight batches" in log, "SIGTERM came with nothing in flight"
    assert proc.popen.returncode == 0
    assert took < grace, f"exited {took:.1f}s after SIGTERM, grace is {grace}s"
    assert "unfinished after the grace period" not in log

    decided = _by_key(read(stack.bootstrap, topics.verdicts, len(events), timeout=3))
    assert 0 < len(decided) < len(events)  # the in-flight ones finished, the rest was left
    # Every batch that finished was acked, and its offsets committed before the worker left.
    assert _committed(stack.bootstrap, topics.group, topics.uploads) == len(decided)

    start_worker(env)  # same consumer group: picks up exactly where the first one stopped
    got = _by_key(read(stack.bootstrap, topics.verdicts, len(events), timeout=120, settle=2))
    assert set(got) == {k.decode() for k, _ in events}
    assert all(len(v) == 1 for v in got.values()), "a committed upload was processed twice"


def test_sigterm_while_triton_is_down_exits_within_the_grace_period_and_loses_nothing(
    stack, topics, worker_env, start_worker, own_triton
):
    grace = 6.0
    env = {
        **worker_env,
        "STREAM_GUARD_TRITON__URL": own_triton.url,
        "STREAM_GUARD_TRITON__TIMEOUT_S": "2",
        "STREAM_GUARD_SHUTDOWN_GRACE_S": str(grace),
    }
    proc, port = start_worker(env)
    own_triton.kill()
    try:
        events = [(f"td{i}".encode(), upload(f"td{i}", f"sunny day {i}")) for i in range(20)]
        publish(stack.bootstrap, topics.uploads, events)
        _wait_for(lambda: "triton" in _readyz(port)[1], "readyz names triton", 10)
        _wait_for(lambda: _in_flight(port) > 0, "batches in flight (retrying)", 10)
        took = _sigterm(proc, grace)
        assert took < grace, f"exited {took:.1f}s after SIGTERM, grace is {grace}s"
        assert "unfinished after the grace period" in proc.log_path.read_text()
        assert read(stack.bootstrap, topics.verdicts, 1, timeout=1) == []
        assert _committed(stack.bootstrap, topics.group, topics.uploads) == 0
    finally:
        own_triton.start()
    start_worker(env)
    _exactly_one_each(
        read(stack.bootstrap, topics.verdicts, 20, timeout=90, settle=2),
        {k.decode() for k, _ in events},
    )
