"""OpenTelemetry tracing: W3C trace context carried in Kafka headers, batch spans linked.

Per the OpenTelemetry messaging conventions: each upload's ``process`` span is a child of the
context its producer put in the ``traceparent`` header, so one trace runs from the platform's
publish to the verdict (and on into the reasoning worker, which reads the same header from the
escalation). A batch span cannot have many parents, so it *links* to every message's context.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

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

TRACER_NAME = "stream_guard"
_configured = False


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
    """Install the SDK tracer provider once per process (no exporter: spans are dropped)."""
    global _configured
    if _configured:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if span_file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(span_file)))
    trace.set_tracer_provider(provider)
    _configured = True


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


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
