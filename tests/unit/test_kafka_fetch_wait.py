"""The worker's Kafka consumer holds empty fetches for ``kafka.fetch_max_wait_ms``, not Faust's
fixed 1.5 s: against Tansu, which answers a held fetch only after about half the wait, that wait
is the consume latency at moderate load (benchmarks/RESULTS.md, 2026-12-01 session 4)."""

import pytest
from pydantic import ValidationError

from stream_guard.kafka import FETCH_MAX_WAIT_MS, Health, create_app
from stream_guard.settings import KafkaSettings, Settings


async def _consumer_wait(kafka: KafkaSettings, app_id: str) -> int:
    app = create_app(kafka, Settings().telemetry, app_id, Health(stall_after_s=10))
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    try:
        return consumer._fetch_max_wait_ms
    finally:
        await consumer.stop()  # never started: closes nothing, but no unclosed warning


async def test_the_worker_consumer_takes_the_configured_fetch_wait():
    kafka = Settings().kafka.model_copy(update={"fetch_max_wait_ms": 37})
    assert await _consumer_wait(kafka, "fetch-wait-37") == 37


async def test_the_default_fetch_wait_is_short():
    assert FETCH_MAX_WAIT_MS == 25
    assert await _consumer_wait(Settings().kafka, "fetch-wait-default") == 25


@pytest.mark.parametrize("bad", ["0", "-5", "30001", "soon"])
def test_a_fetch_wait_out_of_range_is_refused(monkeypatch, bad):
    monkeypatch.setenv("STREAM_GUARD_KAFKA__FETCH_MAX_WAIT_MS", bad)
    with pytest.raises(ValidationError, match="fetch_max_wait_ms"):
        Settings()
