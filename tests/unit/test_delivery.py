"""Delivery building blocks: in-order acks, liveness, byte budget, backoff cap, Triton errors."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from tritonclient.utils import InferenceServerException

from stream_guard.errors import DependencyUnavailable, InferenceError
from stream_guard.events import Verdict
from stream_guard.kafka import Health, InOrderAcks
from stream_guard.media.storage import ByteBudget
from stream_guard.retry import backoff_delay, backoff_delays
from stream_guard.settings import RetrySettings
from stream_guard.triton import triton_error


class _Stream:
    def __init__(self) -> None:
        self.acked: list[tuple[int, int]] = []

    async def ack(self, event) -> None:
        self.acked.append((event.message.partition, event.message.offset))


def _ev(partition: int, offset: int):
    return SimpleNamespace(message=SimpleNamespace(topic="t", partition=partition, offset=offset))


async def test_a_later_batch_is_acked_only_after_every_earlier_event_of_its_partition():
    stream = _Stream()
    acks = InOrderAcks(stream)
    first, second = [_ev(0, 0), _ev(0, 1), _ev(1, 0)], [_ev(0, 2), _ev(1, 1)]
    acks.received(first)
    acks.received(second)
    await acks.finish(second)
    assert stream.acked == [], "partition 0 and 1 both wait for the first batch"
    await acks.finish(first)
    assert sorted(stream.acked) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert acks.pending() == 0


async def test_an_unfinished_batch_holds_back_its_partition_but_not_others():
    stream = _Stream()
    acks = InOrderAcks(stream)
    stuck, done = [_ev(0, 5)], [_ev(0, 6), _ev(2, 9)]
    acks.received(stuck)
    acks.received(done)
    await acks.finish(done)
    assert stream.acked == [(2, 9)]


async def test_redelivery_from_an_earlier_offset_resets_the_partition():
    stream = _Stream()
    acks = InOrderAcks(stream)
    acks.received([_ev(0, 10), _ev(0, 11)])
    again = [_ev(0, 10), _ev(0, 11)]  # a rebalance seeks back to the committed offset
    acks.received(again)
    await acks.finish(again)
    assert stream.acked == [(0, 10), (0, 11)]


def test_liveness_fails_only_when_work_waits_without_progress():
    busy = {"v": False}
    h = Health(stall_after_s=0.05, waiting=lambda: busy["v"])
    h.ready = True
    time.sleep(0.1)
    assert h.live(), "idle is not stalled"
    busy["v"] = True
    assert not h.live() and not h.is_ready(), "waiting work, no progress: not live, not ready"
    h.failing.add("triton")
    assert h.live() and not h.is_ready(), "a dependency outage is not a wedge"
    h.failing.clear()
    h.progressed()
    assert h.live() and h.is_ready()


def test_records_waiting_on_a_dependency_keep_it_down_until_they_finish():
    """A record waiting for its own bucket while the store answers the probe: the probe clears
    ``failing``, but the held dependency keeps the worker unready, naming it, until the
    records finish. It excuses no stall: the worker leaves held-only work out of
    ``waiting()``, and other work that stops making progress is still a wedge."""
    busy = {"v": False}
    h = Health(stall_after_s=0.05, waiting=lambda: busy["v"])
    h.ready = True
    h.hold("s3", 2)
    h.failing.discard("s3")  # what a successful probe does
    time.sleep(0.1)
    assert h.live() and not h.is_ready() and h.down() == {"s3"}
    busy["v"] = True  # other work waits without progress meanwhile
    assert not h.live(), "a held record does not hide a wedge"
    busy["v"] = False
    h.hold("s3", 1)  # another batch's record waits on it too
    h.hold("s3", -2)
    assert h.down() == {"s3"}, "one record still waits"
    h.hold("s3", -1)
    assert h.held == {} and h.down() == set() and h.is_ready()


def test_work_that_only_waits_for_deferred_records_is_not_a_stall():
    from types import SimpleNamespace

    from stream_guard.agents.fast import FastWorker
    from stream_guard.settings import Settings

    worker = FastWorker(Settings())
    queued = {"n": 0}
    unacked = {"n": 0}
    worker.window = SimpleNamespace(pending=lambda: queued["n"])
    worker.acks = SimpleNamespace(pending=lambda: unacked["n"])
    deferring, running = object(), object()
    worker.tasks = {deferring}
    worker.deferring = {deferring}
    worker.health.hold("s3", 1)
    assert not worker._work_waiting(), "only a deferred record waits"
    worker.tasks.add(running)
    assert worker._work_waiting(), "another batch is in flight"
    worker.tasks.discard(running)
    queued["n"] = 5
    assert worker._work_waiting(), "events queued while intake is open: they should move"
    unacked["n"] = worker.max_unacked + 1
    assert not worker._work_waiting(), "intake stopped by the acks the deferred record holds"
    worker.health.hold("s3", -1)
    assert worker._work_waiting(), "the same with nothing held is a wedge"


async def test_byte_budget_bounds_reservations_and_lets_an_oversized_one_run_alone():
    budget = ByteBudget(100)
    order: list[str] = []

    async def hold(name: str, n: int, seconds: float) -> None:
        async with budget.reserve(n):
            order.append(f"+{name}")
            assert budget.used <= 100 or budget.used == n
            await asyncio.sleep(seconds)
            order.append(f"-{name}")

    await asyncio.gather(hold("a", 60, 0.05), hold("b", 60, 0.01), hold("huge", 500, 0.01))
    assert order.index("+b") > order.index("-a") or order.index("+a") > order.index("-b")
    assert budget.used == 0


@pytest.mark.parametrize("attempt", range(12))
def test_backoff_never_exceeds_its_cap_jitter_included(attempt: int):
    for _ in range(50):
        assert backoff_delay(attempt, 0.2, 5.0) <= 5.0


def test_backoff_delays_stop_after_attempts_unless_forever():
    assert len(list(backoff_delays(RetrySettings(attempts=4)))) == 3


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("StatusCode.INVALID_ARGUMENT", InferenceError),
        ("StatusCode.UNAVAILABLE", DependencyUnavailable),
        ("StatusCode.INTERNAL", DependencyUnavailable),
        (None, DependencyUnavailable),
    ],
)
def test_invalid_argument_is_permanent_everything_else_is_triton_unavailable(status, kind):
    err = triton_error("ocr", InferenceServerException("bad", status=status))
    assert isinstance(err, kind)


def _verdict(final: bool) -> Verdict:
    return Verdict.issue(
        upload_id="u1",
        tenant_id="default",
        decision="allow" if final else "escalate",
        final=final,
        mode="fast",
        categories=[],
        policy_id="p",
        policy_version="1",
        model_name="h",
        model_version="1",
    )


def test_a_final_verdict_supersedes_a_provisional_one_never_the_reverse():
    final, provisional = _verdict(True), _verdict(False)
    assert final.supersedes(provisional) and not provisional.supersedes(final)
    assert final.verdict_id != provisional.verdict_id
