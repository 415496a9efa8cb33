"""Crash-safety chaos run: SIGKILL fast workers at random while uploads stream in.

``python -m benchmarks.chaos`` (``make chaos``). On 127.0.0.1 only, it starts the real stack
(moto S3 and tritonserver from ``LocalStack``) with the broker on *durable* storage: Tansu with
``--storage-engine s3://`` on a moto server of its own. Three fast workers (``stream-guard
serve`` child processes) share one consumer group. A producer publishes the uploads at a steady
rate (most text-only, a share with a small image in S3) while a killer SIGKILLs a random worker
at random moments and restarts it at once, so every kill also means two rebalances. When the
kills are done the run waits until every upload has its outcome, then reads every verdict and
escalation and prints:

- uploads in, verdicts out, kills survived;
- lost: uploads with neither a final verdict nor a provisional verdict plus its escalation;
- conflicting: uploads with two verdicts (same ``final`` flag) whose content differs;
- duplicates: verdict records beyond one per (upload, final flag), all identical if
  conflicting is 0 (at-least-once delivery with idempotent verdicts).

A global deadline (``--timeout``) stops everything; unfinished uploads then count as lost. The
result, with the machine and date, is meant for ``benchmarks/CHAOS_RESULTS.md``.

Scenarios (issue 11):

- ``--broker memory`` (the default): worker crash-safety at scale on the in-memory broker;
  ``--sigterm-share`` makes that share of the kills a SIGTERM mid-batch (drain) instead.
- ``--broker durable --broker-kills N``: Tansu on ``s3://`` storage, SIGKILLed and restarted
  N times on the same storage while uploads stream in.
- ``--late-bucket-share F``: that share of uploads reference an allow-listed bucket that only
  appears ``--late-after`` seconds into the run; their batches retry (a missing bucket is
  transient) while later batches of the same partitions finish and workers are killed: the
  commit-gap case. Nothing may be committed past them, so all get verdicts once it appears.

Every 15 s a progress line says how far each side is (published, decided, decided/s, each
worker's in-flight batches and events); when fewer than one upload a second is decided for
45 s while work is waiting, a STUCK line says which side holds it: committed offsets vs what
was published per partition, and how many records a plain consumer fetches from the committed
offsets in 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from stream_guard.dev.demo import landscape
from stream_guard.dev.signals import Interrupted, stop_on_signals
from stream_guard.dev.stack import (
    ACCESS_KEY,
    SECRET_KEY,
    LocalStack,
    Process,
    create_topics,
    free_port,
    s3_client,
    start_broker,
    start_s3,
    start_worker,
)

STATE = Path.cwd() / ".stream-guard" / "chaos"
LOCAL = "127.0.0.1"
CAPTIONS = [
    "Sunset over the hills on our hike today",
    "our family trip to the lake, the kids loved it",
    "new recipe: lemon cake with blueberries",
    "morning run along the river, 10k done",
    "my cat sleeping on the keyboard again",
    "that knife is sharp enough to really hurt somebody",
    "I know where you live and I am going to kill you tonight",
    "first day at the new job, wish me luck",
    "the concert last night was amazing",
    "selling my old bike, barely used",
]


@dataclass
class Config:
    uploads: int
    workers: int
    kills: int
    partitions: int
    image_share: float
    rate: float
    kill_gap: tuple[float, float]
    timeout: float
    seed: int
    broker: str = "memory"
    sigterm_share: float = 0.0
    broker_kills: int = 0
    late_bucket_share: float = 0.0
    late_after: float = 60.0


@dataclass
class Run:
    """What happened, filled in as the run goes."""

    started: float = field(default_factory=time.monotonic)
    published: int = 0
    with_image: int = 0
    kills: int = 0
    sigterms: int = 0
    broker_kills: int = 0
    stuck_reports: int = 0
    per_partition: dict[int, int] = field(default_factory=dict)  # published end offsets
    crashed: int = 0  # workers found dead that nobody killed
    publish_s: float = 0.0
    kills_s: float = 0.0
    done_s: float | None = None
    verdicts: dict[str, list[bytes]] = field(default_factory=dict)
    escalations: dict[str, list[bytes]] = field(default_factory=dict)
    dead_letters: dict[str, list[bytes]] = field(default_factory=dict)
    finals: set[str] = field(default_factory=set)
    provisional: set[str] = field(default_factory=set)
    all_decided: asyncio.Event = field(default_factory=asyncio.Event)

    def decided(self) -> set[str]:
        return self.finals | (self.provisional & set(self.escalations)) | set(self.dead_letters)

    def add(self, sink: dict[str, list[bytes]], key: str, value: bytes, target: int) -> None:
        sink.setdefault(key, []).append(value)
        if sink is self.verdicts:
            (self.finals if json.loads(value)["final"] else self.provisional).add(key)
        upper = len(self.finals) + len(self.provisional) + len(self.dead_letters)
        if upper >= target and len(self.decided()) >= target:  # the union only when it may be
            self.all_decided.set()

    def elapsed(self) -> float:
        return time.monotonic() - self.started


# -- the stack ---------------------------------------------------------------------------------


@dataclass
class MemoryBroker:
    """The stack's own in-memory Tansu: worker kills only."""

    stack: LocalStack

    @property
    def bootstrap(self) -> str:
        return self.stack.bootstrap

    def stop(self) -> None:
        pass


@dataclass
class DurableBroker:
    storage_s3: Process
    broker: Process
    port: int
    env: dict[str, str] = field(default_factory=dict)

    def restart(self, state: Path) -> None:
        """SIGKILL the broker and start it again on the same port and storage."""
        self.broker.kill()
        self.broker = start_broker(state, self.port, storage="s3://tansu-chaos/", env=self.env)

    @property
    def bootstrap(self) -> str:
        return f"{LOCAL}:{self.port}"

    def stop(self) -> None:
        self.broker.stop()
        self.storage_s3.stop()


def start_durable_broker(state: Path) -> DurableBroker:
    s3_port, port = free_port(), free_port()
    storage = start_s3(state, s3_port)
    s3_client(f"http://{LOCAL}:{s3_port}").create_bucket(Bucket="tansu-chaos")
    env = {
        "AWS_ENDPOINT": f"http://{LOCAL}:{s3_port}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
    }
    try:
        broker = start_broker(state, port, storage="s3://tansu-chaos/", env=env)
    except BaseException:
        storage.stop()
        raise
    return DurableBroker(storage, broker, port, env)


def worker_env(stack: LocalStack, broker: DurableBroker, group: str, topics: dict[str, str]):
    env = {
        **stack.env(),
        "STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "STREAM_GUARD_KAFKA__CONSUMER_GROUP": group,
        "STREAM_GUARD_RETRY__MAX_BACKOFF_S": "1.0",
        "STREAM_GUARD_TELEMETRY__LOG_JSON": "true",
    }
    env |= {f"STREAM_GUARD_KAFKA__TOPICS__{role.upper()}": name for role, name in topics.items()}
    for name, value in env.items():  # nothing but this machine's loopback, ever
        if name.endswith(("SERVERS", "URL")) and "127.0.0.1" not in value:
            raise SystemExit(f"{name}={value} is not on 127.0.0.1")
    return env


# -- the three concurrent parts: producer, killer, collector ---------------------------------


def upload_event(n: int, image: str | None) -> tuple[bytes, bytes]:
    uid = f"c{n:06d}"
    event = {
        "upload_id": uid,
        "text": {"caption": f"{CAPTIONS[n % len(CAPTIONS)]} #{n}"},
        "images": [{"uri": image, "content_type": "image/jpeg"}] if image else [],
    }
    return uid.encode(), json.dumps(event).encode()


async def produce(
    cfg: Config, run: Run, bootstrap: str, topic: str, images: list[str], late: list[str]
) -> None:
    from aiokafka import AIOKafkaProducer

    rng = random.Random(cfg.seed)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        tick = 0.25
        per_tick = max(1, round(cfg.rate * tick))
        while run.published < cfg.uploads:
            start = time.monotonic()
            sends = []
            for _ in range(min(per_tick, cfg.uploads - run.published)):
                image = rng.choice(images) if rng.random() < cfg.image_share else None
                if late and rng.random() < cfg.late_bucket_share:
                    image = rng.choice(late)
                run.with_image += image is not None
                key, value = upload_event(run.published, image)
                sends.append(await producer.send(topic, value, key=key))
                run.published += 1
            for meta in await asyncio.gather(*sends):  # acks=all: durable on the broker
                run.per_partition[meta.partition] = max(
                    run.per_partition.get(meta.partition, 0), meta.offset + 1
                )
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - start)))
    finally:
        await producer.stop()
    run.publish_s = run.elapsed()


async def kill_workers(
    cfg: Config,
    run: Run,
    workers: list[Process],
    ports: list[int],
    env: dict[str, str],
    logs: Path,
) -> None:
    rng = random.Random(cfg.seed + 1)
    loop = asyncio.get_running_loop()
    while run.kills < cfg.kills:
        await asyncio.sleep(rng.uniform(*cfg.kill_gap))
        i = rng.randrange(len(workers))
        run.crashed += workers[i].popen.poll() is not None
        how = "SIGTERM" if rng.random() < cfg.sigterm_share else "SIGKILL"
        if how == "SIGTERM":  # mid-batch drain within the grace period, then exit
            await loop.run_in_executor(None, lambda i=i: workers[i].stop(timeout=30.0))
            run.sigterms += 1
        else:
            workers[i].kill()  # SIGKILL: no drain, no commit, no leave-group
        run.kills += 1
        print(
            f"[{run.elapsed():6.0f}s] {how} {run.kills:>2}/{cfg.kills}: worker {i} "
            f"(published {run.published}, decided {len(run.decided())})",
            flush=True,
        )
        await asyncio.sleep(rng.uniform(0.0, 2.0))
        workers[i], ports[i] = await loop.run_in_executor(
            None, lambda i=i: start_worker("serve", env, logs, name=f"chaos-w{i}", wait_ready=False)
        )
    run.kills_s = run.elapsed()


async def collect(
    run: Run, bootstrap: str, topics: dict[str, str], stop: asyncio.Event, target: int
) -> None:
    from aiokafka import AIOKafkaConsumer

    sinks = {
        topics["verdicts"]: run.verdicts,
        topics["escalations"]: run.escalations,
        topics["dlq"]: run.dead_letters,
    }
    consumer = AIOKafkaConsumer(
        *sinks,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for tp, records in batch.items():
                for r in records:
                    run.add(sinks[tp.topic], (r.key or b"").decode(), r.value, target)
    finally:
        await consumer.stop()


def outcome(run: Run, uid: str) -> str | None:
    """ "final", "escalated" (provisional verdict + escalation), "dlq", or None (not yet)."""
    if uid in run.finals:
        return "final"
    if uid in run.provisional and uid in run.escalations:
        return "escalated"
    return "dlq" if uid in run.dead_letters else None


async def wait_until_decided(run: Run) -> None:
    await run.all_decided.wait()
    run.done_s = run.elapsed()
    await asyncio.sleep(3.0)  # late duplicates of redelivered batches still count


async def kill_broker(cfg: Config, run: Run, broker: DurableBroker | MemoryBroker) -> None:
    if cfg.broker_kills <= 0 or not isinstance(broker, DurableBroker):
        return
    rng = random.Random(cfg.seed + 2)
    loop = asyncio.get_running_loop()
    span = cfg.uploads / cfg.rate
    for n in range(cfg.broker_kills):
        await asyncio.sleep(rng.uniform(0.3, 0.9) * span / cfg.broker_kills)
        print(f"[{run.elapsed():6.0f}s] SIGKILL broker {n + 1}/{cfg.broker_kills}", flush=True)
        await loop.run_in_executor(None, broker.restart, STATE)
        run.broker_kills += 1


async def open_late_bucket(cfg: Config, run: Run, s3, bucket: str) -> None:
    if cfg.late_bucket_share <= 0:
        return
    await asyncio.sleep(cfg.late_after)
    # The objects are rendered first: between the bucket appearing and its objects, a retry
    # finds the key missing, which is permanent (a dead letter, as it should be). Keep that
    # window to the puts alone.
    bodies = [landscape(100 + n, (320, 200)) for n in range(4)]
    s3.create_bucket(Bucket=bucket)
    for n, body in enumerate(bodies):
        s3.put_object(Bucket=bucket, Key=f"late/{n}.jpg", Body=body)
    print(f"[{run.elapsed():6.0f}s] bucket {bucket} created: late uploads can proceed", flush=True)


async def _metrics(port: int) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            text = (await client.get(f"http://{LOCAL}:{port}/metrics")).text
    except httpx.HTTPError:
        return {"down": 1.0}
    for line in text.splitlines():
        if line.startswith(("stream_guard_in_flight_batches ", "stream_guard_events_total{")):
            name, _, value = line.rpartition(" ")
            key = "in_flight" if name.startswith("stream_guard_in_flight") else "events"
            out[key] = out.get(key, 0.0) + float(value)
    return out


async def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return {p: (await c.committed(TopicPartition(topic, p))) or 0 for p in range(partitions)}
    finally:
        await c.stop()


async def _fetch_probe(bootstrap: str, topic: str, offsets: dict[int, int]) -> int:
    """Records a plain consumer gets in 5 s from the given offsets: is the broker serving?"""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in offsets]
        c.assign(tps)
        for tp in tps:
            c.seek(tp, offsets[tp.partition])
        got, end = 0, time.monotonic() + 5.0
        while time.monotonic() < end:
            batch = await c.getmany(timeout_ms=500)
            got += sum(len(r) for r in batch.values())
        return got
    finally:
        await c.stop()


async def monitor(
    cfg: Config, run: Run, bootstrap: str, group: str, topic: str, ports: list[int]
) -> None:
    """Progress every 15 s; a STUCK diagnosis when fewer than one upload a second is decided
    for 45 s while work is waiting."""
    last, last_change = 0, time.monotonic()
    while True:
        await asyncio.sleep(15.0)
        decided = len(run.decided())
        now = time.monotonic()
        if decided - last >= 15 or decided >= run.published:  # >= 1/s, or nothing waiting
            last_change = now
        workers = await asyncio.gather(*(_metrics(p) for p in ports))
        side = ", ".join(
            f"w{i}: "
            + (
                "down"
                if "down" in m
                else f"{m.get('in_flight', 0):.0f} in flight, {m.get('events', 0):.0f} events"
            )
            for i, m in enumerate(workers)
        )
        print(
            f"[{run.elapsed():6.0f}s] published {run.published}, decided {decided} "
            f"(+{(decided - last) / 15:.1f}/s); {side}",
            flush=True,
        )
        last = decided
        if now - last_change >= 45.0 and run.published > decided:
            run.stuck_reports += 1
            try:
                committed = await _committed(bootstrap, group, topic, cfg.partitions)
                behind = {p: run.per_partition.get(p, 0) - o for p, o in committed.items()}
                served = await _fetch_probe(bootstrap, topic, committed)
            except Exception as e:  # the diagnosis must not end the run
                print(
                    f"  STUCK: nothing decided for {now - last_change:.0f} s; probe failed: {e!r}"
                )
                continue
            where = (
                "workers (the broker serves records from the committed offsets)"
                if served
                else "broker (no records served from the committed offsets)"
            )
            print(
                f"  STUCK: < 1 decided/s for {now - last_change:.0f} s; uncommitted per "
                f"partition {behind}; a plain consumer fetched {served} records in 5 s "
                f"from the committed offsets: held by the {where}",
                flush=True,
            )


# -- the report --------------------------------------------------------------------------------


def summarize(cfg: Config, run: Run) -> dict[str, int]:
    # Only what was published counts (all of it unless the deadline cut the run short); an
    # upload still without its outcome at the deadline counts as lost.
    ids = [f"c{n:06d}" for n in range(run.published)]
    outcomes = Counter(outcome(run, uid) for uid in ids)
    conflicting = duplicates = 0
    for uid in ids:
        by_flag: dict[bool, list[bytes]] = {}
        for v in run.verdicts.get(uid, []):
            by_flag.setdefault(json.loads(v)["final"], []).append(v)
        if any(len(set(vs)) > 1 for vs in by_flag.values()):
            conflicting += 1
        duplicates += sum(len(vs) - 1 for vs in by_flag.values())
    esc_conflicting = sum(len(set(v)) > 1 for v in run.escalations.values())
    return {
        "uploads_in": run.published,
        "planned": cfg.uploads,
        "verdicts_out": sum(len(v) for v in run.verdicts.values()),
        "final": outcomes["final"],
        "escalated": outcomes["escalated"],
        "dead_lettered": outcomes["dlq"],
        "kills_survived": run.kills,
        "worker_crashes": run.crashed,
        "lost": outcomes[None],
        "conflicting": conflicting + esc_conflicting,
        "duplicates": duplicates,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    except OSError:
        mem = 0.0
    return f"{socket.gethostname()}: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM"


def report(cfg: Config, run: Run, result: dict[str, int], rebalances: int) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    done = (
        f"{run.done_s:.0f} s" if run.done_s else f"not finished by the {cfg.timeout:.0f} s deadline"
    )
    lines = [
        f"stream-guard chaos run, {when}, on {machine()}",
        f"  setup: Tansu on {'s3:// storage (moto)' if cfg.broker == 'durable' else 'memory'}, "
        f"{cfg.workers} fast workers in one group, {cfg.partitions} partitions, seed {cfg.seed}, "
        f"{cfg.rate:.0f} uploads/s, kill gap {cfg.kill_gap[0]:.0f}-{cfg.kill_gap[1]:.0f} s"
        + (
            f", {cfg.late_bucket_share:.0%} of uploads in a bucket that appears at "
            f"{cfg.late_after:.0f} s"
            if cfg.late_bucket_share
            else ""
        ),
        f"  uploads in:      {result['uploads_in']} of {cfg.uploads} planned "
        f"({run.with_image} with an image)",
        f"  verdicts out:    {result['verdicts_out']} records: {result['final']} uploads final, "
        f"{result['escalated']} provisional + escalation, {result['dead_lettered']} dead-lettered",
        f"  kills survived:  {result['kills_survived']} worker kills ({run.sigterms} of them "
        f"SIGTERM), {run.broker_kills} broker SIGKILLs ({rebalances} partition assignments "
        "seen by workers)",
        f"  stuck reports:   {run.stuck_reports}",
        f"  worker crashes:  {result['worker_crashes']} (workers that died without being killed)",
        f"  lost:            {result['lost']}",
        f"  conflicting:     {result['conflicting']}",
        f"  duplicates:      {result['duplicates']} (identical redeliveries)",
        f"  time:            publishing {run.publish_s:.0f} s, kills until {run.kills_s:.0f} s, "
        f"all decided at {done}",
    ]
    return "\n".join(lines)


def count_assignments(logs: Path) -> int:
    return sum(
        p.read_text(errors="replace").count("Setting newly assigned partitions")
        for p in logs.glob("chaos-w*.log")
    )


# -- main --------------------------------------------------------------------------------------


async def chaos(
    cfg: Config, run: Run, stack: LocalStack, broker: DurableBroker | MemoryBroker, logs: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    topics = {r: f"chaos{tag}.{r}" for r in ("uploads", "verdicts", "escalations", "review", "dlq")}
    await create_topics(broker.bootstrap, list(topics.values()), cfg.partitions)
    s3 = s3_client(stack.s3_endpoint)
    images = []
    for n in range(16):
        s3.put_object(Bucket=stack.bucket, Key=f"chaos/{n}.jpg", Body=landscape(n, (320, 200)))
        images.append(f"s3://{stack.bucket}/chaos/{n}.jpg")
    late_bucket = f"late-{tag}"
    late = [f"s3://{late_bucket}/late/{n}.jpg" for n in range(4)] if cfg.late_bucket_share else []
    group = f"chaos-{tag}"
    env = worker_env(stack, broker, group, topics)
    env["STREAM_GUARD_S3__ALLOWED_BUCKETS"] = json.dumps([stack.bucket, late_bucket])
    loop = asyncio.get_running_loop()
    started = []
    for i in range(cfg.workers):  # the first compiles the head if needed; the rest find it
        started.append(
            await loop.run_in_executor(
                None,
                lambda i=i: start_worker("serve", env, logs, name=f"chaos-w{i}", timeout=300),
            )
        )
    workers = [p for p, _ in started]
    ports = [port for _, port in started]
    print(
        f"{cfg.workers} workers ready; publishing {cfg.uploads} uploads at {cfg.rate:.0f}/s",
        flush=True,
    )
    run.started = time.monotonic()
    stop = asyncio.Event()
    collector = asyncio.ensure_future(collect(run, broker.bootstrap, topics, stop, cfg.uploads))
    watcher = asyncio.ensure_future(
        monitor(cfg, run, broker.bootstrap, group, topics["uploads"], ports)
    )
    try:
        await asyncio.gather(
            produce(cfg, run, broker.bootstrap, topics["uploads"], images, late),
            kill_workers(cfg, run, workers, ports, env, logs),
            kill_broker(cfg, run, broker),
            open_late_bucket(cfg, run, s3, late_bucket),
        )
        print(
            f"[{run.elapsed():6.0f}s] publishing and kills done; waiting for every outcome",
            flush=True,
        )
        await wait_until_decided(run)
    finally:
        stop.set()
        watcher.cancel()
        await collector
        run.crashed += sum(w.popen.poll() is not None for w in workers)
        for w in workers:
            w.kill()


def parse_args() -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uploads", type=int, default=5000)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--kills", type=int, default=24)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--image-share", type=float, default=0.1)
    p.add_argument("--rate", type=float, default=30.0, help="uploads published per second")
    p.add_argument(
        "--kill-gap",
        type=float,
        nargs=2,
        default=(4.0, 12.0),
        help="seconds between kills, drawn uniformly",
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="global deadline, stack start included"
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--broker",
        choices=("memory", "durable"),
        default="memory",
        help="memory: worker kills at scale; durable: Tansu on s3:// storage (broker kills)",
    )
    p.add_argument("--sigterm-share", type=float, default=0.0, help="kills that are SIGTERM")
    p.add_argument("--broker-kills", type=int, default=0, help="SIGKILLs of the durable broker")
    p.add_argument(
        "--late-bucket-share",
        type=float,
        default=0.0,
        help="uploads whose bucket appears only --late-after seconds in (commit-gap case)",
    )
    p.add_argument("--late-after", type=float, default=60.0)
    a = p.parse_args()
    if a.broker_kills and a.broker != "durable":
        p.error("--broker-kills needs --broker durable")
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    return Config(
        a.uploads,
        a.workers,
        a.kills,
        a.partitions,
        a.image_share,
        a.rate,
        tuple(a.kill_gap),
        a.timeout,
        seed,
        a.broker,
        a.sigterm_share,
        a.broker_kills,
        a.late_bucket_share,
        a.late_after,
    )


def main() -> None:
    cfg = parse_args()
    begin = time.monotonic()
    STATE.mkdir(parents=True, exist_ok=True)
    logs = STATE / "workers" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    logs.mkdir(parents=True)
    stack = LocalStack(state=STATE)
    broker: DurableBroker | MemoryBroker | None = None
    run = Run()
    try:
        stack.start()
        broker = start_durable_broker(STATE) if cfg.broker == "durable" else MemoryBroker(stack)
        left = cfg.timeout - (time.monotonic() - begin)
        asyncio.run(asyncio.wait_for(chaos(cfg, run, stack, broker, logs), left))
    except TimeoutError:
        print(f"global deadline of {cfg.timeout:.0f} s reached: stopping", flush=True)
    finally:
        if broker is not None:
            broker.stop()
        stack.stop()
    result = summarize(cfg, run)
    print(report(cfg, run, result, count_assignments(logs)))
    print(json.dumps(result))
    raise SystemExit(0 if result["lost"] == 0 and result["conflicting"] == 0 else 1)


if __name__ == "__main__":
    # Started in the background a harness has SIGINT ignored and SIGTERM would skip `finally`:
    # both (and SIGHUP) now unwind and stop every worker, broker, S3 server and tritonserver.
    with stop_on_signals():
        try:
            main()
        except Interrupted as e:
            print(f"{e.signame}: chaos run stopped, no result", flush=True)
            raise SystemExit(128 + e.signum) from None
