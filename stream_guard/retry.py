"""Bounded exponential backoff with jitter: the one backoff formula of the project.

Every retry loop (Triton, S3, the broker, the reasoning server) takes its delays from here, so
the cap a log line or an operator reads is the cap that holds.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from stream_guard.settings import RetrySettings

__all__ = ["backoff_delay", "backoff_delays", "retry_forever"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def backoff_delay(attempt: int, initial_s: float, cap_s: float) -> float:
    """The delay before retry number ``attempt`` (0-based): ``initial * 2^attempt`` with +-20 %
    jitter, then capped, so no delay ever exceeds ``cap_s``."""
    base = initial_s * 2 ** min(attempt, 32)
    return min(base * random.uniform(0.8, 1.2), cap_s)


def backoff_delays(settings: RetrySettings, *, forever: bool = False) -> Iterator[float]:
    """Delays before each retry of ``settings.attempts``.

    ``forever`` keeps yielding (capped) delays after ``attempts``: used where giving up would
    lose an event; the agent stops consuming instead, which is the backpressure we want.
    """
    n = 0
    while forever or n < settings.attempts - 1:
        yield backoff_delay(n, settings.initial_backoff_s, settings.max_backoff_s)
        n += 1


async def retry_forever(
    fn: Callable[[], Awaitable[T]],
    *,
    settings: RetrySettings,
    is_transient: Callable[[BaseException], bool],
    on_retry: Callable[[BaseException, float], None],
) -> T:
    """Await ``fn()`` until it succeeds; transient failures wait a backoff delay (``on_retry``
    logs and counts them), any other exception propagates at once."""
    for delay in backoff_delays(settings, forever=True):
        try:
            return await fn()
        except Exception as e:
            if not is_transient(e):
                raise
            on_retry(e, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
