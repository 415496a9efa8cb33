"""A real worker reports where its CPU goes (issue 14), on the real broker, S3 and Triton."""

from __future__ import annotations

import time

import httpx
import pytest

from stream_guard.dev.demo import landscape
from stream_guard.observability import CPU_STAGES
from tests.conftest import publish, read, upload

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode()


def _samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            head, _, value = line.rpartition(" ")
            label = head.partition('stage="')[2].partition('"')[0]
            out[label] = float(value)
    return out


def test_worker_exports_cpu_per_stage_and_keeps_trace_context_without_an_exporter(
    stack, topics, worker_env, start_worker, s3
):
    s3.put_object(Bucket="uploads", Key="perf/a.jpg", Body=landscape(7))
    _, port = start_worker(worker_env)
    publish(
        stack.bootstrap,
        topics.uploads,
        [
            (
                f"c{n}".encode(),
                upload(f"c{n}", f"a walk by the sea {n}", ["s3://uploads/perf/a.jpg"]),
            )
            for n in range(6)
        ]
        + [(b"text-only", upload("text-only", "lunch with friends"))],
        headers=[("traceparent", TRACEPARENT)],
    )
    verdicts = read(stack.bootstrap, topics.verdicts, 7, timeout=90)
    assert {r.key for r in verdicts} >= {b"text-only", b"c0", b"c5"}
    # No span exporter configured: nothing is recorded, but every verdict still continues the
    # upload's trace.
    for r in verdicts:
        assert dict(r.headers)["traceparent"].decode().split("-")[1] == TRACE_ID
    time.sleep(1.0)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    stages = _samples(text, "stream_guard_cpu_seconds_total{")
    assert set(stages) == set(CPU_STAGES)
    assert all(stages[s] > 0 for s in CPU_STAGES), stages
    process = _samples(text, "process_cpu_seconds_total")[""]
    assert sum(stages.values()) <= process, "stages are disjoint parts of the process CPU"
