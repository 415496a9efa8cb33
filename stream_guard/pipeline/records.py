"""What flows through the fast stage: a consumed record in, outputs to publish out.

Plain data, no Kafka client: the agent builds ``Record`` from Faust events
(``stream_guard.kafka.record_of``) and publishes each ``Output`` to the topic of its role.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MAX_OUTPUT_BYTES", "Deferred", "Output", "Record", "Result", "trace_headers"]

# aiokafka's default producer max_request_size is 1,000,000 bytes for a whole request; an
# output record must fit in it with its key, headers and the request's own framing.
MAX_OUTPUT_BYTES = 1_000_000 - 16_384


@dataclass(frozen=True)
class Record:
    """One consumed Kafka record, as the pipeline sees it."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int
    headers: dict[str, bytes] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True)
class Output:
    role: str  # "verdicts" | "escalations" | "dlq" | "review"
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


@dataclass
class Result:
    record: Record
    outcome: str  # allow | block | escalate | dlq | review
    outputs: list[Output]
    upload_id: str | None = None
    error_code: str | None = None


@dataclass
class Deferred:
    """A record that could not be finished because a dependency it alone needs is down (its
    image's bucket or object store): it is tried again later, the rest of its batch goes on."""

    record: Record
    error: Exception  # a TransientError


def trace_headers(record: Record) -> dict[str, bytes]:
    """The W3C trace context of a record, to carry onto what it produced."""
    return {k: v for k, v in record.headers.items() if k in ("traceparent", "tracestate")}
