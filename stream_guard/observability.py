"""Prometheus metrics and logging setup shared by the workers.

OpenTelemetry tracing: W3C trace context carried in Kafka headers, batch spans linked.

Per the OpenTelemetry messaging conventions: each upload's ``process`` span is a child of the
context its producer put in the ``traceparent`` header, so one trace runs from the platform's
publish to the verdict (and on into the reasoning worker, which reads the same header from the
escalation). A batch span cannot have many parents, so it *links* to every message's context.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from prometheus_client import Counter, Gauge, Histogram

T = TypeVar("T")

__all__ = [
    "BATCH_SIZE",
    "CATEGORY_FLAGS",
    "CONSUMER_LAG",
    "CPU_SECONDS",
    "CPU_STAGES",
    "DEAD_LETTERS",
    "DEPENDENCY_UP",
    "END_TO_END_SECONDS",
    "EVENTS",
    "IN_FLIGHT",
    "JsonFormatter",
    "JsonLinesSpanExporter",
    "LATENCY_BUCKETS",
    "POLICY_VERSION",
    "PROM_CONTENT_TYPE",
    "READY",
    "RETRIES",
    "STAGE_SECONDS",
    "STALLED_SECONDS",
    "TRACER_NAME",
    "TraceContextFilter",
    "UNACKED",
    "cpu_stage",
    "cpu_timed",
    "extract",
    "faust_logging_config",
    "inject",
    "link_to",
    "recording",
    "setup_logging",
    "setup_tracing",
    "span",
    "tracer",
]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

EVENTS = Counter("stream_guard_events_total", "Upload events by outcome", ["outcome"])
DEAD_LETTERS = Counter("stream_guard_dead_letters_total", "Dead letters by error code", ["code"])
CATEGORY_FLAGS = Counter(
    "stream_guard_category_flags_total",
    "Category flagged (escalate or block)",
    ["policy", "category"],
)
BATCH_SIZE = Histogram(
    "stream_guard_batch_size", "Uploads per processed batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
STAGE_SECONDS = Histogram(
    "stream_guard_stage_seconds", "Time per batch stage", ["stage"], buckets=LATENCY_BUCKETS
)
END_TO_END_SECONDS = Histogram(
    "stream_guard_end_to_end_seconds",
    "Upload event timestamp to verdict acknowledged by the broker",
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("stream_guard_in_flight_batches", "Batches being processed")
RETRIES = Counter("stream_guard_retries_total", "Transient failures retried", ["dependency"])
READY = Gauge("stream_guard_ready", "1 when broker, S3 and Triton are reachable")
DEPENDENCY_UP = Gauge("stream_guard_dependency_up", "Last probe result", ["dependency"])
CONSUMER_LAG = Gauge("stream_guard_consumer_lag", "Records behind the log end", ["partition"])
STALLED_SECONDS = Gauge(
    "stream_guard_stalled_seconds", "Seconds without a finished batch while work is waiting"
)
UNACKED = Gauge("stream_guard_unacked_events", "Events received and not yet acknowledged")
POLICY_VERSION = Gauge(
    "stream_guard_policy_info", "Active policy head version", ["policy", "policy_version", "model"]
)

# Where the fast worker's CPU goes, per upload stage (issue 14). Thread CPU time
# (``time.thread_time``) of synchronous sections only: a section never spans an ``await``, so
# CPU that other coroutines use meanwhile is never counted twice. What no stage covers (the
# Kafka clients, Faust, gRPC transport, the event loop, tracing) is the process CPU
# (``process_cpu_seconds_total``) minus their sum; benchmarks/e2e.py reports both per upload.
CPU_STAGES = ("parse", "fetch", "decode", "preprocess", "score", "serialise", "publish")
CPU_SECONDS = Counter(
    "stream_guard_cpu_seconds_total",
    "Worker CPU seconds (thread CPU time) spent in each fast-path stage",
    ["stage"],
)
_CPU = {stage: CPU_SECONDS.labels(stage) for stage in CPU_STAGES}


class cpu_stage:  # noqa: N801 - used like a function: ``with cpu_stage("decode"):``
    """Adds the calling thread's CPU time inside the block to ``CPU_SECONDS{stage}``.

    Only for blocks without ``await``: inside one, the thread would also run other tasks.
    """

    __slots__ = ("_counter", "_start")

    def __init__(self, stage: str) -> None:
        self._counter = _CPU[stage]
        self._start = 0.0

    def __enter__(self) -> cpu_stage:
        self._start = time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self._counter.inc(time.thread_time() - self._start)


def cpu_timed(stage: str, fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` with its thread CPU time counted under ``stage`` (for work handed to a pool)."""

    def timed(*args: object, **kwargs: object) -> T:
        with cpu_stage(stage):
            return fn(*args, **kwargs)

    return timed


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields (upload_id, trace_id, where) are kept."""

    KEEP = ("upload_id", "trace_id", "span_id", "where", "error_code", "tenant_id")

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in self.KEEP:
            if hasattr(record, key):
                payload[key] = getattr(record, key)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def setup_logging(level: str = "INFO", json_logs: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_logs
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# aiohttp refuses a charset inside content_type; Prometheus reads plain text format 0.0.4.
PROM_CONTENT_TYPE = "text/plain"


class TraceContextFilter(logging.Filter):
    """Adds the current OpenTelemetry trace and span ids to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = f"{ctx.trace_id:032x}"
            record.span_id = f"{ctx.span_id:016x}"
        return True


def faust_logging_config(level: str, json_logs: bool) -> dict | None:
    """dictConfig for faust.Worker (which replaces root handlers at start): JSON lines."""
    if not json_logs:
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "stream_guard.observability.JsonFormatter"}},
        "filters": {"trace": {"()": "stream_guard.observability.TraceContextFilter"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["trace"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["default"]},
    }


TRACER_NAME = "stream_guard"
_configured = False
_recording = False


class JsonLinesSpanExporter(SpanExporter):
    """Writes finished spans as JSON lines (debugging, and how tests read a worker's spans)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(json.loads(s.to_json())) + "\n" for s in spans]
        with self._lock, self.path.open("a") as fh:
            fh.writelines(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def setup_tracing(service_name: str, otlp_endpoint: str | None, span_file: Path | None) -> None:
    """Install the SDK tracer provider once per process, when something receives the spans.

    Without an exporter OpenTelemetry's no-op tracer stays in place: it records nothing but still
    carries each upload's trace context (its ``traceparent`` goes on to the verdict, so the trace
    continues from the producer's span), while the SDK would build every span only to drop it,
    about 0.2 ms of the worker's CPU per upload (issue 14).
    """
    global _configured, _recording
    if _configured:
        return
    _configured = True
    if not otlp_endpoint and not span_file:
        return
    _recording = True
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if span_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(span_file)))
    trace.set_tracer_provider(provider)


def recording() -> bool:
    """Whether spans are recorded and exported (``setup_tracing`` got an exporter)."""
    return _recording


_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)


def span(name: str, **kwargs: Any) -> AbstractContextManager[trace.Span]:
    """A span of a stage inside an upload or batch (``start_as_current_span`` arguments), or a
    shared no-op when spans are not recorded: even a no-op span costs a few microseconds, and
    the worker opens several per upload. Each upload's own ``process`` span is always opened
    with ``tracer()``: it carries the upload's trace context to its outputs and logs."""
    if not _recording:
        return _NO_SPAN
    return tracer().start_as_current_span(name, **kwargs)


_tracer: trace.Tracer | None = None


def tracer() -> trace.Tracer:
    """The project's tracer, looked up once: ``get_tracer`` builds and compares an
    instrumentation scope on every call, a measurable share of the worker's CPU per upload.
    Before ``setup_tracing`` this is OpenTelemetry's proxy, which follows the provider set later.
    """
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(TRACER_NAME)
    return _tracer


def extract(headers: Mapping[str, bytes]) -> otel_context.Context:
    carrier = {k: v.decode("latin-1") for k, v in headers.items()}
    return propagate.extract(carrier)


def inject(ctx: otel_context.Context | None = None) -> dict[str, bytes]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return {k: v.encode("latin-1") for k, v in carrier.items()}


def link_to(headers: Mapping[str, bytes]) -> trace.Link | None:
    span_ctx = trace.get_current_span(extract(headers)).get_span_context()
    return trace.Link(span_ctx) if span_ctx.is_valid else None
