"""Plain aiokafka and boto3 clients for the CLI's one-shot commands (submit, tail).

Same broker credentials and TLS as the workers (``settings.kafka``), same S3 endpoint and keys
(``settings.s3``); the workers' Faust clients live in ``stream_guard/kafka.py``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stream_guard.settings import KafkaSettings, S3Settings

__all__ = [
    "kafka_options",
    "s3_client",
    "start_kafka_client",
]

_STACK_HINT = (
    "check STREAM_GUARD_KAFKA__BOOTSTRAP_SERVERS; for the local stack: `stream-guard stack env`"
)


def kafka_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka keyword arguments for the CLI: the workers' security settings, and a bounded
    request timeout so a command never hangs on an unreachable broker."""
    from stream_guard.kafka import aiokafka_options

    return {**aiokafka_options(kafka), "request_timeout_ms": 15_000}


async def start_kafka_client(client: Any, kafka: KafkaSettings) -> None:
    """``client.start()``, or a CliError naming the broker when it cannot be reached."""
    from aiokafka.errors import KafkaConnectionError

    from stream_guard.cli.failures import CliError, debugging

    if not debugging():  # the error below says it in one line; aiokafka would log it twice
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        await client.start()
    except KafkaConnectionError as e:
        await client.stop()
        raise CliError(f"cannot reach Kafka at {kafka.bootstrap_servers}", _STACK_HINT) from e


def s3_client(s3: S3Settings) -> Any:
    from stream_guard.media.storage import s3_client as client  # boto3 only when needed

    return client(s3)
