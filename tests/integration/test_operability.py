"""Traces, metrics and health of a real worker run."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import publish, read, upload

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e%04x"


def _traceparent(n: int) -> bytes:
    return f"00-{TRACE_ID % n}-00f067aa0ba902b{n % 10}-01".encode()


def test_one_trace_per_upload_from_producer_to_verdict_with_linked_batch_span(
    stack, topics, worker_env, start_worker, tmp_path
):
    span_file = tmp_path / "spans.jsonl"
    proc, port = start_worker({**worker_env, "STREAM_GUARD_TELEMETRY__SPAN_FILE": str(span_file)})
    for n in (1, 2, 3):
        publish(
            stack.bootstrap,
            topics.uploads,
            [(f"tr{n}".encode(), upload(f"tr{n}", f"a calm lake number {n}"))],
            headers=[("traceparent", _traceparent(n))],
        )
    publish(
        stack.bootstrap,
        topics.uploads,
        [(b"trbad", b"garbage")],
        headers=[("traceparent", _traceparent(4))],
    )
    verdicts = read(stack.bootstrap, topics.verdicts, 3, timeout=60)
    dlq = read(stack.bootstrap, topics.dlq, 1, timeout=30)
    time.sleep(1.0)

    # The verdict and dead-letter headers continue each upload's own trace.
    for rec in [*verdicts, *dlq]:
        n = {"tr1": 1, "tr2": 2, "tr3": 3, "trbad": 4}[rec.key.decode()]
        tp = dict(rec.headers)["traceparent"].decode()
        assert tp.split("-")[1] == TRACE_ID % n

    spans = [json.loads(line) for line in span_file.read_text().splitlines()]
    process = [s for s in spans if s["name"] == f"{topics.uploads} process"]
    by_trace = {s["context"]["trace_id"][2:]: s for s in process}
    for n in (1, 2, 3, 4):
        span = by_trace[TRACE_ID % n]
        assert span["parent_id"] == "0x00f067aa0ba902b" + str(n % 10)
        assert span["kind"] == "SpanKind.CONSUMER"
    batches = [s for s in spans if s["name"] == f"{topics.uploads} process batch"]
    linked = {link["context"]["trace_id"][2:] for b in batches for link in b["links"]}
    assert {TRACE_ID % n for n in (1, 2, 3, 4)} <= linked
    names = {s["name"] for s in spans}
    assert {"triton infer text_encoder", "policy decide", "publish"} <= names
    s3_or_decode = [s for s in spans if s["name"] in ("s3 get", "image decode")]
    assert s3_or_decode == []  # text-only uploads fetch nothing

    # Structured logs: the dead letter's line names its record and the upload's trace.
    lines = [json.loads(x) for x in proc.log_path.read_text().splitlines() if x.startswith("{")]
    # (a log file is appended to: an earlier worker on the same port left its own lines)
    dead = [
        x
        for x in lines
        if x.get("error_code") == "event.malformed"
        and x.get("where", "").startswith(f"{topics.uploads}[")
    ]
    assert dead and dead[0]["where"].startswith(f"{topics.uploads}[")
    assert dead[0]["trace_id"] == TRACE_ID % 4


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            if head.split("{")[0] == name:
                total += float(value)
    return total


def test_metrics_move_and_health_endpoints_answer(stack, topics, worker_env, start_worker):
    _, port = start_worker(worker_env)
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/healthz").status_code == 200
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    before = httpx.get(f"{base}/metrics").text
    publish(
        stack.bootstrap,
        topics.uploads,
        [
            (b"m1", upload("m1", "lunch with friends")),
            (b"m2", upload("m2", "I will hunt you down and kill you")),
            (b"m3", b"[]"),
        ],
    )
    read(stack.bootstrap, topics.verdicts, 2, timeout=60)
    read(stack.bootstrap, topics.dlq, 1, timeout=30)
    time.sleep(1.5)
    after = httpx.get(f"{base}/metrics").text
    assert _metric(after, "stream_guard_events_total", outcome="allow") >= 1
    assert _metric(after, "stream_guard_events_total", outcome="dlq") >= 1
    assert _metric(after, "stream_guard_dead_letters_total", code="event.malformed") >= 1
    assert _metric(after, "stream_guard_batch_size_count") > _metric(
        before, "stream_guard_batch_size_count"
    )
    assert _metric(after, "stream_guard_stage_seconds_count", stage="process") >= 1
    assert _metric(after, "stream_guard_end_to_end_seconds_count") >= 3
    assert _metric(after, "stream_guard_dependency_up", dependency="triton") == 1
    assert "stream_guard_consumer_lag{" in after  # observed per assigned partition
