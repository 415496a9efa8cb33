"""Tracing costs nothing it need not (issue 14): without an exporter no span is built."""

from __future__ import annotations

from opentelemetry import trace

from stream_guard import observability as obs


def test_without_an_exporter_stage_spans_are_one_shared_no_op():
    assert not obs.recording()  # no test in this process installs an exporter
    first, second = obs.span("s3 get"), obs.span("triton infer text_encoder", kind=None)
    assert first is second
    with first as span:
        assert span is trace.INVALID_SPAN
        span.set_attribute("s3.uri", "s3://bucket/key")  # accepted and dropped
        assert not span.is_recording()


def test_the_tracer_is_looked_up_once():
    assert obs.tracer() is obs.tracer()


def test_an_upload_context_still_reaches_its_outputs_without_an_exporter():
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with obs.tracer().start_as_current_span(
        "t process", context=obs.extract({"traceparent": parent.encode()})
    ):
        headers = obs.inject()
    assert headers["traceparent"].decode().split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
