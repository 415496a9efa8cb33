"""Plain aiokafka clients for the review console (a web service, not a Faust worker).

The console reads whole topics from the beginning without a consumer group (every replica builds
the same queue) and publishes decisions with ``acks=all``; the workers' Faust home is
``stream_guard/kafka.py``.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream_guard.kafka import aiokafka_options
from stream_guard.settings import KafkaSettings

__all__ = ["client_options", "reader", "writer"]


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    return aiokafka_options(kafka)


def reader(kafka: KafkaSettings, topics: list[str]) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        **client_options(kafka),
        group_id=None,
        enable_auto_commit=False,
        # Some Kafka-compatible brokers answer ListOffsets(LATEST) wrongly: always from the start.
        auto_offset_reset="earliest",
        fetch_max_wait_ms=200,
    )


def writer(kafka: KafkaSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(**client_options(kafka), acks="all", request_timeout_ms=15_000)
