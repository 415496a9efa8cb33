"""Bounded exponential backoff with jitter for transient failures."""

from __future__ import annotations

import random
from collections.abc import Iterator

from .settings import RetrySettings


def backoff_delays(settings: RetrySettings, *, forever: bool = False) -> Iterator[float]:
    """Delays before each retry: initial * 2^n, capped, with +-20 % jitter.

    ``forever`` keeps yielding the capped delay after ``attempts`` (used where giving up would
    lose an event: the agent stops consuming instead, which is the backpressure we want).
    """
    delay = settings.initial_backoff_s
    n = 0
    while forever or n < settings.attempts - 1:
        yield min(delay, settings.max_backoff_s) * random.uniform(0.8, 1.2)
        delay *= 2
        n += 1
