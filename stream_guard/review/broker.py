"""Plain aiokafka clients for the review console (a web service, not a Faust worker).

The console reads whole topics from the beginning without a consumer group (every replica builds
the same queue) and publishes decisions with ``acks=all``; the workers' Faust home is
``stream_guard/kafka.py``.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stream_guard.settings import KafkaSettings

__all__ = ["client_options", "reader", "writer"]


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context(
            cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None
        )
    if kafka.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = kafka.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = (
            kafka.sasl_password.get_secret_value() if kafka.sasl_password else ""
        )
    return options


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
