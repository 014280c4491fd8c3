"""Waiting for what no event announces: a file another host wrote, a record another request is still
writing, a Redis that is coming back. Waits double from `first` up to `cap` seconds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def delays(first: float, cap: float) -> Iterator[float]:
    """first, 2 × first, 4 × first, … and `cap` from then on, without end."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


def poll(fetch: Callable[[], T | None], *, timeout: float, first: float, cap: float,
         stop: Callable[[], bool] | None = None) -> T | None:
    """What `fetch()` returns once it is not None, trying until `timeout` seconds have passed (at least
    once); None at the deadline, or as soon as `stop()` says there is no point waiting on."""
    deadline = time.monotonic() + timeout
    for delay in delays(first, cap):
        found = fetch()
        if found is not None:
            return found
        left = deadline - time.monotonic()
        if left <= 0 or (stop is not None and stop()):
            return None
        time.sleep(min(delay, left))  # nothing to be woken by: see the module's docstring
    return None  # unreachable: delays() never ends
