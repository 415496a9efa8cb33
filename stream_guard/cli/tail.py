"""`stream-guard tail`: print a topic's records as JSON lines, from the beginning.

The topic is a role of the settings (uploads, verdicts, escalations, review, dlq, ...) or the
name of a topic that exists. Nothing here creates a topic: the broker's list is read first
and partitions are assigned explicitly, so a typo is an error instead of a new empty topic
(brokers that auto-create topics do so on a metadata request for an unknown name).
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import typer

from stream_guard.cli.failures import CliError

if TYPE_CHECKING:
    from stream_guard.settings import Settings

__all__ = [
    "TailOptions",
    "resolve_topic",
    "roles",
    "tail",
]


def roles(settings: Settings) -> dict[str, str]:
    """Topic role -> topic name, from the settings (``STREAM_GUARD_KAFKA__TOPICS__*``)."""
    topics = settings.kafka.topics.model_dump()
    return {role: name for role, name in topics.items() if isinstance(name, str)}


def resolve_topic(topic: str, role_names: dict[str, str], existing: set[str], where: str) -> str:
    """The topic to read for ``topic`` (a role or a name); CliError when it does not exist."""
    name = role_names.get(topic, topic)
    if name in existing:
        return name
    what = f"topic {name!r} (role {topic})" if topic in role_names else f"topic {name!r}"
    visible = sorted(t for t in existing if not t.startswith("__"))
    close = difflib.get_close_matches(topic, [*role_names, *visible], n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise CliError(
        f"{what} does not exist on {where}; tail never creates topics",
        f"{hint}roles: {', '.join(role_names)}; or a topic name"
        + (f" ({len(visible)} exist, e.g. {', '.join(visible[:3])})" if visible else ""),
    )


@dataclass(frozen=True)
class TailOptions:
    topic: str
    count: int  # 0: no limit
    follow: bool
    idle: float
    upload_id: str | None


async def tail(settings: Settings, opts: TailOptions) -> int:
    """Print the records; the number printed."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from stream_guard.cli.clients import kafka_options, start_kafka_client

    consumer = AIOKafkaConsumer(
        **kafka_options(settings.kafka),
        auto_offset_reset="earliest",
        group_id=None,
        enable_auto_commit=False,
    )
    await start_kafka_client(consumer, settings.kafka)
    try:
        existing = set(await consumer.topics())
        name = resolve_topic(
            opts.topic, roles(settings), existing, settings.kafka.bootstrap_servers
        )
        parts = consumer.partitions_for_topic(name) or set()
        consumer.assign([TopicPartition(name, p) for p in sorted(parts)])
        await consumer.seek_to_beginning()
        return await _print_records(consumer, opts)
    finally:
        await consumer.stop()


async def _print_records(consumer, opts: TailOptions) -> int:
    seen, last = 0, time.monotonic()
    while opts.count == 0 or seen < opts.count:
        batch = await consumer.getmany(timeout_ms=500)
        for msgs in batch.values():
            for m in msgs:
                if opts.upload_id and (m.key or b"").decode(errors="replace") != opts.upload_id:
                    continue
                typer.echo(m.value.decode(errors="replace") if m.value is not None else "null")
                seen += 1
                last = time.monotonic()
                if opts.count and seen >= opts.count:
                    return seen
        if not opts.follow and time.monotonic() - last > opts.idle:
            break
    return seen
