"""End-to-end benchmark: bare Triton ceiling, naive consumer and stream-guard, in one run.

``python -m benchmarks.e2e`` (``make bench``) starts one local stack (Tansu, moto, tritonserver;
state in .stream-guard/bench), uploads a fixed corpus of distinct synthetic photos, then measures
side by side:

(a) the ceiling: the bare Triton models doing the per-upload work at a sweep of concurrencies;
(b) the floor: a naive one-at-a-time consumer (aiokafka -> boto3 -> Pillow -> tritonclient);
(c) stream-guard: ``stream-guard serve`` worker process(es) under a backlog burst (maximum
    throughput) and open-loop loads at fixed fractions of the ceiling.

Every stream-guard phase also reports the worker's CPU per upload (its process CPU from /proc
over the phase / uploads answered) split by stage, from the worker's own
``stream_guard_cpu_seconds_total{stage}`` counters (issue 14), next to throughput and latency.

It prints a table and the target ratios and appends a dated section (with a JSON block) to
benchmarks/RESULTS.md. Every phase is bounded; the whole run stops by itself (about 5 minutes
on a 2-core machine). ``--sweep`` instead tries worker tunables. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from aiokafka import AIOKafkaProducer

from stream_guard.dev.signals import Interrupted, stop_on_signals
from stream_guard.dev.stack import (
    ACCESS_KEY,
    SECRET_KEY,
    LocalStack,
    Process,
    s3_client,
    start_worker,
)
from stream_guard.observability import CPU_STAGES
from stream_guard.policy.model import head_model_name
from stream_guard.settings import BatchSettings, MediaSettings, Settings

from . import procstat, report
from . import triton_metrics as tmx
from .ceiling import Work, best, measure_point, open_loop
from .corpus import Item, detector_input, make_corpus, upload_corpus, upload_event
from .load import Collector, phase_summary, produce
from .stats import latency_summary

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".stream-guard" / "bench"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TUNABLES = ("BATCH__MAX_SIZE", "BATCH__WINDOW_S", "BATCH__MAX_IN_FLIGHT", "MEDIA__DECODE_WORKERS")


def log(msg: str = "") -> None:
    print(msg, flush=True)


# -- the stack -------------------------------------------------------------------------------


@dataclass
class BenchStack(LocalStack):
    """LocalStack, or broker + S3 only when the models are served by an external (GPU) Triton."""

    external_triton: str | None = None
    external_repository: Path | None = None

    @property
    def triton_url(self) -> str:
        return self.external_triton or super().triton_url

    @property
    def model_repository(self) -> Path:
        return self.external_repository or super().model_repository

    def start(self) -> BenchStack:
        if not self.external_triton:
            super().start()
            return self
        from stream_guard.dev.stack import start_broker, start_s3

        self.state.mkdir(parents=True, exist_ok=True)
        try:
            self.processes["kafka"] = start_broker(self.state, self.kafka_port)
            self.processes["s3"] = start_s3(self.state, self.s3_port)
            s3_client(self.s3_endpoint).create_bucket(Bucket=self.bucket)
        except BaseException:
            self.stop()
            raise
        return self


@dataclass
class Bench:
    args: argparse.Namespace
    stack: BenchStack
    items: list[Item]
    head: str
    metrics_url: str | None
    extra_roots: dict[str, int] = field(default_factory=dict)

    def roots(self) -> dict[str, int]:
        names = {"kafka": "broker", "s3": "s3", "triton": "triton"}
        out = {names[k]: p.popen.pid for k, p in self.stack.processes.items() if k in names}
        out["harness"] = os.getpid()
        return {**out, **self.extra_roots}

    def meter(self) -> Meter:
        self.prioritise()
        return Meter(self)

    def prioritise(self) -> None:
        """``--autogroup-nice``: the scheduler groups of everything this harness started (the
        stack, workers, the naive consumer) get that nice value, so jobs other sessions run
        at a positive nice yield to the benchmark as they mean to (see set_autogroup_nice)."""
        if self.args.autogroup_nice is not None:
            procstat.set_autogroup_nice({"harness": os.getpid()}, self.args.autogroup_nice)


class Meter:
    """CPU per component, CPU of everything else on the machine, and Triton's counters."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.roots = bench.roots()
        self.t0 = time.monotonic()
        self.busy0 = procstat.system_busy_seconds()
        self.nice0 = procstat.system_nice_seconds()
        self.cpu0 = procstat.tree_cpu_seconds(self.roots, frozenset({"harness"}))
        self.triton0 = tmx.scrape(bench.metrics_url)

    def finish(self) -> dict:
        wall = time.monotonic() - self.t0
        cpu1 = procstat.tree_cpu_seconds(self.roots, frozenset({"harness"}))
        busy = procstat.system_busy_seconds() - self.busy0
        niced = procstat.system_nice_seconds() - self.nice0  # nothing of ours runs niced
        cpu = procstat.cpu_delta(self.cpu0, cpu1, wall)
        ours = sum(cpu1.get(n, 0) - self.cpu0.get(n, 0) for n in cpu1)
        # Niced background jobs, reported apart (their kernel time stays in `other`). They
        # still count as noise: they fill every gap between the benchmark's wake-ups, and a
        # wake-up then waits for their time slice (measured: latency phases with niced jobs
        # at 35-90 % of a core had twice the p99).
        cpu["other processes"] = round(100 * max(busy - ours - niced, 0.0) / wall, 1)
        cpu["other processes, niced"] = round(100 * niced / wall, 1)
        cpu["machine busy"] = round(100 * busy / wall, 1)
        seconds = {n: round(max(cpu1[n] - self.cpu0.get(n, 0.0), 0.0), 3) for n in cpu1}
        return {
            "wall_s": round(wall, 1),
            "cpu_seconds": seconds,
            "cpu_percent_of_one_core": cpu,
            "triton": tmx.summarize(self.triton0, tmx.scrape(self.bench.metrics_url)),
        }


# -- (a) the ceiling -------------------------------------------------------------------------


def _other(meter: dict) -> float:
    cpu = meter["cpu_percent_of_one_core"]
    return cpu["other processes"] + cpu.get("other processes, niced", 0.0)


def _work(bench: Bench) -> Work:
    images = np.stack([detector_input(i.jpeg) for i in bench.items])
    return Work([i.caption.encode() for i in bench.items], images, bench.head)


def run_bare_open_loop(bench: Bench, rate: float) -> dict:
    """The bare models alone, open loop at ``rate`` (the pipeline's 70 %-of-max rate): how much
    of that phase's tail is the models queueing for this machine's CPU."""
    count = max(10, int(rate * bench.args.phase_seconds))
    meter = bench.meter()
    p = asyncio.run(open_loop(bench.stack.triton_url, _work(bench), rate, count))
    p["meter"] = meter.finish()
    log(
        f"  bare Triton, open loop at {rate:.1f}/s: p50 {p['p50_ms']} p95 {p['p95_ms']} "
        f"p99 {p['p99_ms']} ms"
    )
    return p


def run_ceiling(bench: Bench) -> dict:
    a = bench.args
    log("(a) ceiling: bare Triton, per-upload work (text + image, then head)")
    work = _work(bench)
    url = bench.stack.triton_url
    grid = [(c, 1) for c in a.concurrency]
    grid += [(int(c), int(b)) for c, b in (cb.split("x") for cb in a.client_batches)]
    points = []
    whole = bench.meter()
    for c, b in grid:
        for attempt in (1, 2):
            meter = bench.meter()
            p = asyncio.run(measure_point(url, work, c, b, a.ceiling_seconds, warmup_s=1.0))
            p["meter"] = meter.finish()
            noisy = _other(p["meter"]) > a.noise_limit
            log(
                f"  ceiling  concurrency {c:>3} batch {b:>2}: {p['uploads_per_s']:6.1f} uploads/s  "
                f"p50 {p['p50_ms']} ms  p99 {p['p99_ms']} ms"
                + (f" (per request of {b})" if b > 1 else "")
                + (f"  [other programs {_other(p['meter']):.0f} %]" if noisy else "")
            )
            if attempt == 1:
                kept = p
            elif _other(p["meter"]) < _other(kept["meter"]):
                p["first_attempt"] = {k: kept[k] for k in ("uploads_per_s", "p99_ms")}
                kept = p
            if not noisy or attempt == 2:
                break
            wait_quiet(60, a.quiet_threshold, bench)
        points.append(kept)
    result = best(points)
    result["meter"] = whole.finish()
    return result


# -- (b) the floor ---------------------------------------------------------------------------


def run_naive(bench: Bench) -> dict:
    a = bench.args
    stack = bench.stack
    tag = uuid.uuid4().hex[:6]
    uploads, verdicts = f"bench.naive-{tag}.uploads", f"bench.naive-{tag}.verdicts"
    stack.create_topics([uploads, verdicts])
    log(f"(b) naive one-at-a-time consumer: backlog of {a.naive_count} uploads")

    async def backlog() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
        await producer.start()
        try:
            await produce(producer, uploads, a.naive_count, None, lambda k: _event(bench, "n", k))
        finally:
            await producer.stop()

    asyncio.run(backlog())
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        report_path = fh.name
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.naive",
        "--bootstrap",
        stack.bootstrap,
        "--uploads-topic",
        uploads,
        "--verdicts-topic",
        verdicts,
        "--group",
        f"naive-{tag}",
        "--s3-endpoint",
        stack.s3_endpoint,
        "--s3-key",
        ACCESS_KEY,
        "--s3-secret",
        SECRET_KEY,
        "--triton-url",
        stack.triton_url,
        "--head",
        bench.head,
        "--count",
        str(a.naive_count),
        "--max-seconds",
        str(a.naive_seconds),
        "--report",
        report_path,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(STATE / "naive.log", "ab")
    )
    bench.extra_roots["naive"] = proc.pid
    meter = bench.meter()
    try:
        proc.wait(timeout=a.naive_seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except BaseException:  # a stop signal: the naive consumer is no child `stop_on_signals` knows
        proc.kill()
        proc.wait(5)
        raise
    finally:
        bench.extra_roots.pop("naive", None)
    metered = meter.finish()
    data = json.loads(Path(report_path).read_text() or "{}")
    os.unlink(report_path)
    if proc.returncode != 0 or not data.get("processed"):
        raise RuntimeError(f"naive consumer failed (exit {proc.returncode}); see {STATE}/naive.log")
    rate = data["processed"] / max(data["busy_wall_s"], 1e-3)
    result = {
        "processed": data["processed"],
        "uploads_per_s": round(rate, 1),
        "service_time": latency_summary(data["service_s"]),
        "meter": metered,
        # The same per-upload work one message at a time: a reference for the worker's figure.
        "cpu_ms_per_upload": round(1000 * data.get("busy_cpu_s", 0.0) / data["processed"], 2),
    }
    log(
        f"  naive: {result['uploads_per_s']} uploads/s over {data['processed']} uploads, "
        f"service time p50 {result['service_time']['p50_ms']} ms "
        f"p99 {result['service_time']['p99_ms']} ms"
    )
    return result


def _event(bench: Bench, phase: str, k: int, tag: str = "") -> tuple[str, bytes]:
    item = bench.items[k % len(bench.items)]
    uid = f"b{tag}-{phase}-{k}"
    return uid, upload_event(item, uid, bench.stack.bucket)


# -- (c) stream-guard --------------------------------------------------------------------------


def worker_settings(env: dict[str, str]) -> dict[str, object]:
    """The batch/media settings a worker with ``env`` runs with (defaults filled in)."""
    batch, media = BatchSettings(), MediaSettings()
    get = lambda k, d: env.get(f"STREAM_GUARD_{k}", d)  # noqa: E731
    return {
        "batch.max_size": int(get("BATCH__MAX_SIZE", batch.max_size)),
        "batch.window_s": float(get("BATCH__WINDOW_S", batch.window_s)),
        "batch.max_in_flight": int(get("BATCH__MAX_IN_FLIGHT", batch.max_in_flight)),
        "media.decode_workers": int(get("MEDIA__DECODE_WORKERS", media.decode_workers)),
    }


def _worker_metrics(port: int) -> dict[str, float]:
    """Batch sizes, stage seconds, CPU seconds per stage and the process CPU, from the worker's
    own Prometheus endpoint."""
    out: dict[str, float] = {}
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return out
    wanted = (
        "stream_guard_batch_size_sum",
        "stream_guard_batch_size_count",
        "stream_guard_stage_seconds_sum",
        "stream_guard_stage_seconds_count",
        "stream_guard_cpu_seconds_total",
        "process_cpu_seconds_total",
    )
    for line in text.splitlines():
        if line.startswith(wanted):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _worker_delta(before: list[dict], after: list[dict]) -> dict:
    def total(snaps: list[dict], key: str) -> float:
        return sum(s.get(key, 0.0) for s in snaps)

    def delta(key: str) -> float:
        return total(after, key) - total(before, key)

    n = delta("stream_guard_batch_size_count")
    s = delta("stream_guard_batch_size_sum")
    out: dict = {"batches": int(n), "avg_batch": round(s / n, 2) if n else None}
    for stage in ("process", "publish"):
        c = delta(f'stream_guard_stage_seconds_count{{stage="{stage}"}}')
        out[f"{stage}_ms_per_batch"] = (
            round(1000 * delta(f'stream_guard_stage_seconds_sum{{stage="{stage}"}}') / c, 1)
            if c
            else None
        )
    out["cpu_stage_s"] = {
        stage: round(delta(f'stream_guard_cpu_seconds_total{{stage="{stage}"}}'), 4)
        for stage in CPU_STAGES
    }
    out["process_cpu_s"] = round(delta("process_cpu_seconds_total"), 3)
    return out


def cpu_per_upload(process_s: float, stage_s: dict[str, float], uploads: int) -> dict:
    """Worker CPU ms per upload: the process total (from /proc), each stage, and the rest
    (Kafka clients, Faust, gRPC transport, the event loop, tracing, timers)."""
    if not uploads:
        return {}
    ms = {stage: round(1000 * v / uploads, 3) for stage, v in stage_s.items()}
    total = 1000 * process_s / uploads
    return {
        "total_ms": round(total, 2),
        "stages_ms": ms,
        "rest_ms": round(total - sum(ms.values()), 2),
    }


def start_workers(
    bench: Bench, count: int, env: dict[str, str], tag: str
) -> list[tuple[Process, int]]:
    stack = bench.stack
    names = {
        k: f"bench.sg-{tag}.{k}" for k in ("uploads", "verdicts", "escalations", "review", "dlq")
    }
    stack.create_topics(list(names.values()))
    full = {
        **stack.env(),
        **{f"STREAM_GUARD_KAFKA__TOPICS__{k.upper()}": v for k, v in names.items()},
        "STREAM_GUARD_KAFKA__CONSUMER_GROUP": f"bench-{tag}",
        **env,
    }
    if bench.args.triton_url:
        full["STREAM_GUARD_TRITON__URL"] = bench.args.triton_url
    workers = []
    for n in range(count):
        workers.append(start_worker("serve", full, STATE / "workers", name=f"serve-{tag}-{n}"))
    return workers


RETRY_IF_NOISY = ("burst", "70pct-of-max")
Phase = tuple[str, float | None, int]  # name (also part of upload ids), rate or None, count


async def run_worker_phases(
    bench: Bench, workers: list[tuple[Process, int]], tag: str, first: list[Phase], then=None
) -> dict:
    """Warm up, run the ``first`` phases, then those ``then(results so far)`` plans.

    A phase is (name, rate per second or None for a backlog burst, number of uploads).
    """
    stack = bench.stack
    uploads = f"bench.sg-{tag}.uploads"
    collector = Collector(stack.bootstrap, [f"bench.sg-{tag}.verdicts", f"bench.sg-{tag}.dlq"])
    await collector.start()
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
    await producer.start()
    results: dict[str, dict] = {}
    rss_peak = [0 for _ in workers]
    try:
        # Warm-up: group join (Tansu delays it by half the session timeout), first batches.
        sent = await produce(producer, uploads, 48, None, lambda k: _event(bench, "warm", k, tag))
        if not await collector.wait_for([s.upload_id for s in sent], 120):
            raise RuntimeError(f"worker did not answer the warm-up uploads; see {STATE}/workers")
        await asyncio.sleep(bench.args.settle_seconds)
        idle = await _idle(bench, workers)
        queue = list(first)
        planned = then is None
        while queue:
            name, rate, count = queue.pop(0)
            result = await _phase(
                bench, workers, producer, collector, uploads, tag, name, rate, count
            )
            if name in RETRY_IF_NOISY and _other(result["meter"]) > bench.args.noise_limit:
                # The phases the targets are computed from: repeat once on a quieter machine.
                log(
                    f"  {name}: other programs used {_other(result['meter']):.0f} % of a core; "
                    "repeating it"
                )
                await asyncio.to_thread(wait_quiet, 60, bench.args.quiet_threshold, bench)
                again = await _phase(
                    bench,
                    workers,
                    producer,
                    collector,
                    uploads,
                    tag,
                    f"{name}-again",
                    rate,
                    count,
                )
                attempts = [
                    {
                        "delivered_per_s": r.get("delivered_per_s"),
                        "p99_ms": r.get("latency", {}).get("p99_ms"),
                        "other_cpu": _other(r["meter"]),
                    }
                    for r in (result, again)
                ]
                if _other(again["meter"]) < _other(result["meter"]):
                    result = again
                result["attempts"] = attempts
            results[name] = result
            if not queue and not planned:
                queue, planned = list(then(results)), True
        for n, (p, _) in enumerate(workers):
            rss_peak[n] = procstat.memory_kib(p.popen.pid).get("VmHWM", 0)
    finally:
        await producer.stop()
        await collector.stop()
    return {
        "phases": results,
        "idle": idle,
        "worker_peak_rss_mib": [round(r / 1024, 1) for r in rss_peak],
        "duplicates_seen": collector.duplicates,
    }


async def _idle(bench: Bench, workers: list[tuple[Process, int]]) -> dict:
    """The workers' CPU with no traffic (fetch polling, probes, timers): what a quiet worker
    costs per second, which low-load phases divide by few uploads."""
    meter = bench.meter()
    await asyncio.sleep(bench.args.idle_seconds)
    metered = meter.finish()
    cpu = metered["cpu_percent_of_one_core"]
    per_worker = [cpu.get(f"worker-{n + 1}", 0.0) for n in range(len(workers))]
    log(f"  idle: worker CPU {per_worker} % of one core over {metered['wall_s']} s")
    return {"worker_cpu_percent": per_worker, "meter": metered}


async def _phase(
    bench: Bench,
    workers: list[tuple[Process, int]],
    producer: AIOKafkaProducer,
    collector: Collector,
    uploads: str,
    tag: str,
    name: str,
    rate: float | None,
    count: int,
) -> dict:
    before = [_worker_metrics(port) for _, port in workers]
    meter = bench.meter()
    sent = await produce(producer, uploads, count, rate, lambda k: _event(bench, name, k, tag))
    done = await collector.wait_for([s.upload_id for s in sent], bench.args.drain_seconds)
    metered = meter.finish()
    after = [_worker_metrics(port) for _, port in workers]
    summary = phase_summary(sent, collector)
    summary["rate_target_per_s"] = round(rate, 2) if rate else None
    summary["complete"] = done
    summary["meter"] = metered
    summary["worker"] = _worker_delta(before, after)
    worker_s = sum(metered["cpu_seconds"].get(f"worker-{n + 1}", 0.0) for n in range(len(workers)))
    summary["worker_cpu"] = cpu_per_upload(
        worker_s, summary["worker"]["cpu_stage_s"], summary.get("answered", 0)
    )
    rss = [procstat.memory_kib(p.popen.pid).get("VmRSS", 0) for p, _ in workers]
    summary["worker_rss_mib"] = [round(r / 1024, 1) for r in rss]
    _log_phase(name, summary)
    await asyncio.sleep(0.5)
    return summary


def _log_phase(name: str, s: dict) -> None:
    lat = s.get("latency", {})
    tri = s["meter"]["triton"]
    batches = "/".join(
        str(tri.get(m, {}).get("avg_batch", "-")) for m in ("text_encoder", "image_detector")
    )
    offered = f"{s['rate_target_per_s']:.1f}/s" if s["rate_target_per_s"] else "burst"
    log(
        f"  {name:<14} offered {offered:>8}  delivered {s.get('delivered_per_s', 0):6.1f}/s  "
        f"p50 {lat.get('p50_ms')} p95 {lat.get('p95_ms')} p99 {lat.get('p99_ms')} ms  "
        f"worker CPU {s.get('worker_cpu', {}).get('total_ms')} ms/upload  "
        f"triton batch text/image {batches}  worker batch {s['worker']['avg_batch']}  "
        f"{'' if s['complete'] else 'INCOMPLETE '}{s['answered']}/{s['sent']}"
        + (f"  DEAD LETTERS {s['decisions']['dlq']}" if s.get("decisions", {}).get("dlq") else "")
    )


def run_stream_guard(
    bench: Bench, ceiling_rate: float, workers_count: int, env: dict[str, str], loads: list[float]
) -> dict:
    """Burst (maximum throughput), then open-loop ``loads`` (fractions of the ceiling) and
    70 % of the maximum just measured; ``loads=None`` runs the burst only."""
    a = bench.args
    tag = uuid.uuid4().hex[:6]
    log(f"(c) stream-guard: {workers_count} worker(s), {worker_settings(env)}")
    workers = start_workers(bench, workers_count, env, tag)
    for n, (p, _) in enumerate(workers):
        bench.extra_roots[f"worker-{n + 1}"] = p.popen.pid
    burst = max(a.burst_min, int(ceiling_rate * a.burst_seconds))

    def plan(results: dict) -> list[Phase]:
        if loads is None:
            return []
        max_rate = results["burst"].get("delivered_per_s") or ceiling_rate
        phases = [
            (
                f"{round(f * 100)}pct-ceiling",
                f * ceiling_rate,
                max(10, int(f * ceiling_rate * a.phase_seconds)),
            )
            for f in loads
        ]
        return [
            *phases,
            ("70pct-of-max", 0.7 * max_rate, max(10, int(0.7 * max_rate * a.phase_seconds))),
        ]

    try:
        out = asyncio.run(run_worker_phases(bench, workers, tag, [("burst", None, burst)], plan))
    finally:
        for n, (p, _) in enumerate(workers):
            bench.extra_roots.pop(f"worker-{n + 1}", None)
            p.stop(timeout=30)
    out["workers"] = workers_count
    out["settings"] = worker_settings(env)
    return out


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    p.add_argument("--uploads", type=int, default=64, help="distinct images in the corpus")
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16, 32],
        help="ceiling sweep: concurrent single-upload requests",
    )
    p.add_argument(
        "--client-batches",
        nargs="*",
        default=["1x8", "2x8"],
        help="ceiling points with client-side batches, CONCURRENCYxBATCH",
    )
    p.add_argument("--ceiling-seconds", type=float, default=5.0, help="per ceiling point")
    p.add_argument("--naive-count", type=int, default=300)
    p.add_argument("--naive-seconds", type=float, default=20.0)
    p.add_argument(
        "--loads",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 0.7, 1.0, 1.3],
        help="open-loop offered loads, as fractions of the measured ceiling",
    )
    p.add_argument("--phase-seconds", type=float, default=15.0, help="per open-loop phase")
    p.add_argument(
        "--burst-seconds",
        type=float,
        default=12.0,
        help="backlog size in seconds of ceiling throughput (max-throughput phase)",
    )
    p.add_argument("--burst-min", type=int, default=200)
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=60.0,
        help="how long a phase waits for its last verdicts",
    )
    p.add_argument("--settle-seconds", type=float, default=3.0)
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=5.0,
        help="measure the idle workers' CPU this long before the first phase",
    )
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="worker counts; the first runs every phase, others the burst only",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra STREAM_GUARD_* variables for the worker (e.g. BATCH__MAX_SIZE=16)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="instead: burst + 70%% load for a grid of worker tunables",
    )
    p.add_argument("--triton-url", help="external Triton gRPC host:port (GPU variant)")
    p.add_argument("--triton-metrics-url", help="its metrics, e.g. http://gpu-host:8002/metrics")
    p.add_argument(
        "--model-repository",
        type=Path,
        help="the external Triton's model repository (where heads are written)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=90.0,
        help="wait up to this long for other programs to go quiet before starting",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=25.0,
        help="'quiet': other programs use less than this %% of one core",
    )
    p.add_argument(
        "--noise-limit",
        type=float,
        default=40.0,
        help="repeat a ceiling point, the burst or the 70%% phase once when other "
        "programs used more than this %% of one core during it",
    )
    p.add_argument(
        "--autogroup-nice",
        type=int,
        default=None,
        help="give the benchmark's scheduler autogroups this nice value (e.g. -20, needs "
        "CAP_SYS_NICE) so other sessions' niced jobs yield to it; default: leave them",
    )
    p.add_argument("--label", default="", help="a note for the results section")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def _env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        key = key if key.startswith("STREAM_GUARD_") else f"STREAM_GUARD_{key}"
        out[key] = value
    return out


SWEEP = [
    {},
    {"BATCH__MAX_SIZE": "8"},
    {"BATCH__MAX_SIZE": "16"},
    {"BATCH__WINDOW_S": "0.005"},
    {"BATCH__WINDOW_S": "0.05"},
    {"BATCH__MAX_IN_FLIGHT": "1"},
    {"BATCH__MAX_IN_FLIGHT": "6"},
    {"MEDIA__DECODE_WORKERS": "1"},
    {"MEDIA__DECODE_WORKERS": "4"},
    {"BATCH__MAX_SIZE": "8", "BATCH__MAX_IN_FLIGHT": "4"},
    {"BATCH__MAX_SIZE": "16", "BATCH__WINDOW_S": "0.05", "BATCH__MAX_IN_FLIGHT": "2"},
]


def wait_quiet(max_wait_s: float, threshold_pct: float, bench: Bench | None = None) -> float:
    """Wait (bounded) until other programs use less than ``threshold_pct`` of one core.

    On a shared machine a benchmark that starts while someone else's test suite runs measures
    that test suite. Returns the other programs' share over the last 3-second sample.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        roots = bench.roots() if bench else {}
        ours0 = procstat.tree_cpu_seconds(roots, frozenset({"harness"}))
        b0 = procstat.system_busy_seconds()
        time.sleep(3)
        ours = sum(procstat.tree_cpu_seconds(roots, frozenset({"harness"})).values())
        other = 100 * (procstat.system_busy_seconds() - b0 - (ours - sum(ours0.values()))) / 3
        if other < threshold_pct or time.monotonic() >= deadline:
            return round(max(other, 0.0), 1)
        log(f"  machine busy ({other:.0f} % of one core used by other programs); waiting ...")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.quiet_wait > 0:
        busy = wait_quiet(a.quiet_wait, a.quiet_threshold)
        log(f"other programs use {busy} % of one core before the start")
    machine = procstat.machine()
    log(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB, "
        f"load {machine['load_avg_at_start']}, commit {machine['git_commit'][:10]}"
    )
    t_start = time.monotonic()
    stack = BenchStack(
        state=STATE, external_triton=a.triton_url, external_repository=a.model_repository
    )
    log(f"starting the local stack in {STATE} ...")
    with stack.running():
        metrics_url = a.triton_metrics_url or (
            None if a.triton_url else f"http://127.0.0.1:{stack.triton.metrics}/metrics"
        )
        items = make_corpus(a.uploads)
        size = upload_corpus(s3_client(stack.s3_endpoint), stack.bucket, items)
        log(
            f"stack up in {time.monotonic() - t_start:.0f}s; corpus: {len(items)} JPEGs "
            f"({size // len(items) // 1024} KiB average) in s3://{stack.bucket}/bench/"
        )
        head = head_model_name(Settings().triton.head_model, stack.policies[0].policy_id)
        bench = Bench(a, stack, items, head, metrics_url)
        if a.sweep:
            results = run_sweep(bench)
        else:
            results = run_main(bench)
    results["machine"] = machine
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    results["duration_s"] = round(time.monotonic() - t_start)
    results["label"] = a.label
    results["triton"] = a.triton_url or "local CPU tritonserver (Python backend + onnxruntime)"
    text = report.render(results)
    log("")
    log(text)
    if not a.no_write:
        report.append(a.results, text, results)
        log(f"appended to {a.results}")
    return 0


def run_main(bench: Bench) -> dict:
    a = bench.args
    env = _env(a.env)
    ceiling = run_ceiling(bench)
    ceiling_rate = ceiling["best_any"]["uploads_per_s"]
    naive = run_naive(bench)
    runs = [
        run_stream_guard(bench, ceiling_rate, n, env, a.loads if i == 0 else None)
        for i, n in enumerate(a.workers)
    ]
    at_70 = runs[0]["phases"].get("70pct-of-max", {}).get("rate_target_per_s")
    return {
        "mode": "main",
        "ceiling": ceiling,
        "naive": naive,
        "bare_at_70pct": run_bare_open_loop(bench, at_70) if at_70 else None,
        "stream_guard": runs,
        "window_s": worker_settings(env)["batch.window_s"],
    }


def run_sweep(bench: Bench) -> dict:
    a = bench.args
    ceiling = run_ceiling(bench)
    ceiling_rate = ceiling["best_any"]["uploads_per_s"]
    rows = []
    for config in SWEEP:
        env = _env([f"{k}={v}" for k, v in config.items()] + a.env)
        rows.append({"config": config, **run_stream_guard(bench, ceiling_rate, 1, env, [])})
    return {
        "mode": "sweep",
        "ceiling": ceiling,
        "sweep": rows,
        "window_s": worker_settings(_env(a.env))["batch.window_s"],
    }


if __name__ == "__main__":
    # Started in the background a harness has SIGINT ignored and SIGTERM would skip `finally`:
    # both (and SIGHUP) now unwind and stop every worker, the naive consumer, broker, S3, Triton.
    with stop_on_signals():
        try:
            code = main()
        except Interrupted as e:
            log(f"{e.signame}: benchmark stopped, nothing recorded")
            code = 128 + e.signum
    sys.exit(code)
