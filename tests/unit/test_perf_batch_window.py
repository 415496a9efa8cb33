"""The adaptive batch window (issue 14): at once without a backlog, fuller batches with one.

Behaviour only, never timing: a window of a minute that is not waited for shows the batch left
at once; latency and batch sizes under load are measured by benchmarks/e2e.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from stream_guard.kafka import BatchWindow

MINUTE = 60.0


def _ev(offset: int, partition: int = 0):
    return SimpleNamespace(message=SimpleNamespace(topic="t", partition=partition, offset=offset))


async def _chunks(events, gate: asyncio.Event | None = None, after: int = 0):
    """One event per chunk, like ``noack_take(1)``; waits on ``gate`` after ``after`` events."""
    for n, e in enumerate(events):
        if gate is not None and n == after:
            await gate.wait()
        yield [e]


def _offsets(batch) -> list[int]:
    return [e.message.offset for e in batch]


async def test_an_event_leaves_at_once_when_no_more_are_known_to_be_waiting():
    window = BatchWindow(32, MINUTE, highwater=lambda t, p: 1)  # offset 0 is the log's end
    feeder = asyncio.ensure_future(window.feed(_chunks([_ev(0)])))
    batch = await asyncio.wait_for(window.next_batch(), 10)
    assert _offsets(batch) == [0]
    await feeder


async def test_with_a_backlog_the_batch_waits_for_the_records_the_broker_holds():
    gate = asyncio.Event()
    window = BatchWindow(32, MINUTE, highwater=lambda t, p: 4)  # offsets 0..3 exist
    feeder = asyncio.ensure_future(window.feed(_chunks([_ev(o) for o in range(4)], gate, 1)))
    batching = asyncio.ensure_future(window.next_batch())
    await asyncio.sleep(0.05)
    assert not batching.done(), "three more records are known to exist: wait for them"
    gate.set()
    batch = await asyncio.wait_for(batching, 10)
    assert _offsets(batch) == [0, 1, 2, 3]
    await feeder


async def test_a_backlog_that_does_not_arrive_is_waited_for_only_until_the_window_ends():
    window = BatchWindow(32, 0.05, highwater=lambda t, p: 100)
    gate = asyncio.Event()  # never set: the rest of the backlog never comes
    feeder = asyncio.ensure_future(window.feed(_chunks([_ev(0), _ev(1)], gate, 1)))
    batch = await asyncio.wait_for(window.next_batch(), 10)
    assert _offsets(batch) == [0]
    feeder.cancel()


async def test_a_full_batch_leaves_at_once_whatever_the_backlog():
    window = BatchWindow(3, MINUTE, highwater=lambda t, p: 1000)
    feeder = asyncio.ensure_future(window.feed(_chunks([_ev(o) for o in range(7)])))
    first = await asyncio.wait_for(window.next_batch(), 10)
    second = await asyncio.wait_for(window.next_batch(), 10)
    assert _offsets(first) == [0, 1, 2] and _offsets(second) == [3, 4, 5]
    feeder.cancel()


async def test_the_queue_is_bounded_so_the_stream_stops_taking_when_batches_wait():
    window = BatchWindow(4, MINUTE)
    feeder = asyncio.ensure_future(window.feed(_chunks([_ev(o) for o in range(10)])))
    await asyncio.sleep(0.05)
    assert not feeder.done() and window.pending() == 4, "backpressure: at most max_size queued"
    feeder.cancel()


async def test_events_keep_stream_order_across_partitions():
    events = [_ev(0, 0), _ev(0, 1), _ev(1, 0), _ev(1, 1), _ev(2, 0)]
    window = BatchWindow(32, MINUTE, highwater=lambda t, p: {0: 3, 1: 2}[p])
    await window.feed(_chunks(events))
    batch = await asyncio.wait_for(window.next_batch(), 10)
    assert batch == events


@pytest.mark.parametrize("highwater", [None, "raises"])
async def test_a_partition_without_a_known_high_watermark_counts_as_no_backlog(highwater):
    def mark(topic, partition):
        if highwater == "raises":
            raise AssertionError("Partition is not assigned")  # aiokafka, after a revocation
        return None

    window = BatchWindow(32, MINUTE, highwater=mark)
    await window.feed(_chunks([_ev(5)]))
    assert window.backlog() == 1, "only the queued event"
    batch = await asyncio.wait_for(window.next_batch(), 10)
    assert _offsets(batch) == [5] and window.backlog() == 0
