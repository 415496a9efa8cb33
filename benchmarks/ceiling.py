"""(a) The ceiling: the bare Triton models doing exactly the per-upload work, no Kafka, no S3.

Per upload: ``text_encoder`` on the caption and ``image_detector`` on one preprocessed 320x320
image (concurrently, like the pipeline), then the policy's ``guard_head`` on the result. Inputs
are prepared before timing, so only Triton (and the gRPC client) is measured. A closed-loop
sweep over concurrency (requests of one upload each, perf_analyzer style) finds the best
concurrency; a few points with client-side batches (the way the worker sends a whole batch in
one request) show whether batching on the client raises the ceiling further.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient

from .stats import latency_summary


@dataclass(frozen=True)
class Work:
    texts: list[bytes]
    images: np.ndarray  # [N, 320, 320, 3] uint8
    head: str


def _inputs(work: Work, start: int, batch: int):
    idx = [(start + k) % len(work.texts) for k in range(batch)]
    text = np.array([[work.texts[i]] for i in idx], dtype=np.object_)
    t = grpcclient.InferInput("TEXT", list(text.shape), "BYTES")
    t.set_data_from_numpy(text)
    img = np.ascontiguousarray(work.images[idx])
    m = grpcclient.InferInput("IMAGE", list(img.shape), "UINT8")
    m.set_data_from_numpy(img)
    return t, m


async def _one(client, work: Work, start: int, batch: int) -> None:
    t, m = _inputs(work, start, batch)
    emb, sig = await asyncio.gather(
        client.infer("text_encoder", [t], outputs=[grpcclient.InferRequestedOutput("EMBEDDING")]),
        client.infer("image_detector", [m], outputs=[grpcclient.InferRequestedOutput("SIGNALS")]),
    )
    e = np.ascontiguousarray(emb.as_numpy("EMBEDDING"), dtype=np.float32)
    s = np.ascontiguousarray(sig.as_numpy("SIGNALS"), dtype=np.float32)
    a = grpcclient.InferInput("TEXT_EMBEDDING", list(e.shape), "FP32")
    a.set_data_from_numpy(e)
    b = grpcclient.InferInput("IMAGE_SIGNALS", list(s.shape), "FP32")
    b.set_data_from_numpy(s)
    out = await client.infer(work.head, [a, b], outputs=[grpcclient.InferRequestedOutput("SCORES")])
    if out.as_numpy("SCORES") is None:
        raise RuntimeError(f"{work.head} returned no SCORES")


async def measure_point(
    url: str, work: Work, concurrency: int, batch: int, duration_s: float, warmup_s: float
) -> dict:
    """Closed loop: ``concurrency`` workers, each sending one request of ``batch`` uploads."""
    client = grpcclient.InferenceServerClient(url)
    latencies: list[float] = []
    done_uploads = 0
    t_start = time.perf_counter()
    t_measure = t_start + warmup_s
    t_end = t_measure + duration_s

    async def loop(n: int) -> None:
        nonlocal done_uploads
        i = n * batch
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            await _one(client, work, i, batch)
            t1 = time.perf_counter()
            i += concurrency * batch
            if t0 >= t_measure and t1 <= t_end:
                latencies.append(t1 - t0)
                done_uploads += batch

    try:
        await asyncio.gather(*(loop(n) for n in range(concurrency)))
    finally:
        await client.close()
    return {
        "concurrency": concurrency,
        "client_batch": batch,
        "uploads_per_s": round(done_uploads / duration_s, 1),
        **latency_summary(latencies),
        "requests": len(latencies),
    }


async def open_loop(url: str, work: Work, rate: float, count: int) -> dict:
    """One-upload requests on a fixed schedule, never waiting for answers: the bare models'
    latency at an offered rate, to set beside the pipeline's at the same rate (what the box's
    CPU queueing alone costs). Latency counts from each request's scheduled start, so a
    client that falls behind does not hide the delay."""
    client = grpcclient.InferenceServerClient(url)
    latencies: list[float] = []
    start = time.perf_counter()

    async def one(i: int) -> None:
        await _one(client, work, i, 1)
        latencies.append(time.perf_counter() - (start + i / rate))

    tasks = []
    try:
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return {
        "rate_per_s": round(rate, 2),
        "uploads_per_s": round(count / (time.perf_counter() - start), 1),
        **latency_summary(latencies),
        "requests": count,
    }


def best(points: list[dict], knee: float = 0.95) -> dict:
    """The best concurrency, the best point overall, and one upload alone.

    The best concurrency is the lowest one within ``knee`` of the highest single-upload
    throughput (the knee of the curve): past it a closed loop only adds queueing, so its p99
    says more about the client's concurrency than about the model.
    """
    single = [p for p in points if p["client_batch"] == 1]
    top = max(p["uploads_per_s"] for p in single)
    return {
        "points": points,
        "best_per_upload": min(
            (p for p in single if p["uploads_per_s"] >= knee * top),
            key=lambda p: p["concurrency"],
        ),
        "best_any": max(points, key=lambda p: p["uploads_per_s"]),
        # One upload alone: the bare model latency without client-side queueing.
        "unloaded": next((p for p in single if p["concurrency"] == 1), None),
    }
