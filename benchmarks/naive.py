"""(b) The floor: the consumer a user writes first, one message at a time.

aiokafka consumer -> boto3 ``get_object`` -> Pillow decode + the project's detector
preprocessing -> tritonclient (sync gRPC): text_encoder, image_detector, guard_head, one request
each -> produce the verdict and wait for the broker -> commit the offset -> next message.
Correct and at-least-once, but nothing overlaps and nothing is batched.

Run as its own process by the benchmark (``python -m benchmarks.naive ...``) so that it does not
share an interpreter (and a GIL) with the load generator. On exit it writes its per-message
service times to ``--report``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import boto3
import numpy as np
import tritonclient.grpc as grpcclient
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from stream_guard.policy.model import load_policy
from stream_guard.settings import DEFAULT_POLICY

from .corpus import detector_input


def _infer(
    client, model: str, inputs: dict[str, tuple[np.ndarray, str]], output: str
) -> np.ndarray:
    tensors = []
    for name, (array, dtype) in inputs.items():
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    return client.infer(model, tensors).as_numpy(output)


async def run(args: argparse.Namespace) -> dict:
    policy = load_policy(DEFAULT_POLICY)
    s3 = boto3.client(
        "s3",
        endpoint_url=args.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=args.s3_key,
        aws_secret_access_key=args.s3_secret,
    )
    triton = grpcclient.InferenceServerClient(args.triton_url)
    consumer = AIOKafkaConsumer(
        args.uploads_topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all")
    await producer.start()
    await consumer.start()
    service: list[float] = []
    first = last = None
    cpu_first = cpu_last = 0.0  # process CPU from the first message's start to the last's end
    try:
        while len(service) < args.count:
            if first is not None and time.perf_counter() - first > args.max_seconds:
                break
            try:
                msg = await asyncio.wait_for(consumer.getone(), args.idle_timeout)
            except TimeoutError:
                break
            t0 = time.perf_counter()
            if first is None:
                cpu_first = time.process_time()
            event = json.loads(msg.value)
            bucket, key = event["images"][0]["uri"][5:].split("/", 1)
            jpeg = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            image = detector_input(jpeg)[None]
            caption = event["text"]["caption"]
            emb = _infer(
                triton,
                "text_encoder",
                {"TEXT": (np.array([[caption.encode()]], dtype=np.object_), "BYTES")},
                "EMBEDDING",
            )
            sig = _infer(triton, "image_detector", {"IMAGE": (image, "UINT8")}, "SIGNALS")
            scores = _infer(
                triton,
                args.head,
                {
                    "TEXT_EMBEDDING": (emb.astype(np.float32), "FP32"),
                    "IMAGE_SIGNALS": (sig.astype(np.float32), "FP32"),
                },
                "SCORES",
            )[0]
            decision, categories = policy.decide(
                dict(zip(policy.codes, scores.tolist(), strict=True))
            )
            verdict = {
                "upload_id": event["upload_id"],
                "decision": str(decision),
                "final": str(decision) != "escalate",
                "categories": [c.model_dump(mode="json") for c in categories],
            }
            await producer.send_and_wait(
                args.verdicts_topic, json.dumps(verdict).encode(), key=msg.key
            )
            await consumer.commit({TopicPartition(msg.topic, msg.partition): msg.offset + 1})
            now = time.perf_counter()
            service.append(now - t0)
            first = first or t0
            last = now
            cpu_last = time.process_time()
    finally:
        await consumer.stop()
        await producer.stop()
        triton.close()
    return {
        "processed": len(service),
        "service_s": service,
        "busy_wall_s": (last - first) if service else 0.0,
        "busy_cpu_s": cpu_last - cpu_first,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--uploads-topic", required=True)
    p.add_argument("--verdicts-topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--s3-endpoint", required=True)
    p.add_argument("--s3-key", required=True)
    p.add_argument("--s3-secret", required=True)
    p.add_argument("--triton-url", required=True)
    p.add_argument("--head", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--idle-timeout", type=float, default=20.0)
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop after this long busy")
    p.add_argument("--report", required=True)
    args = p.parse_args()
    result = asyncio.run(run(args))
    with open(args.report, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
