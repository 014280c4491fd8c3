"""Which jobs with pages in this process are still wanted: read for all of them in one round trip.

A batched engine holds a page per slot (128 on a big GPU, and the pages prefetched beside them), and
each page's thread asks four times a second whether its job was cancelled, failed or deleted, so that
the page leaves the batch instead of decoding on to its token cap. Read one page at a time, that was
500 and more reads a second from one worker, growing with the fleet. Here the threads share one
pipelined read of every watched job's status, at most once an interval, done by whichever thread
asks first once the last read is that old; the others answer from it at once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from ..job import JobStatus


class JobWatch:
    """Jobs watched while their pages run, and which of them are over (final, or gone)."""

    def __init__(self, read: Callable[[Sequence[str]], Sequence[str | None]], *, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        """Each job's status, or None for a job that no longer exists (JobStore.statuses)."""
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._reading = threading.Lock()
        self._watched: Counter[str] = Counter()  # job id: pages of it watched now
        self._over: set[str] = set()
        self._read_at: float | None = None

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[None]:
        with self._lock:
            self._watched[job_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._watched[job_id] -= 1
                if self._watched[job_id] <= 0:
                    del self._watched[job_id]
                    self._over.discard(job_id)

    def over(self, job_id: str) -> bool:
        """Whether the job was over at the last read: at most `interval` seconds old, as long as Redis
        answers. The caller that finds the read stale makes the next one, and gets its error if Redis
        fails it (the others go on with what the last read said; the next caller tries again once
        `interval` has passed)."""
        if self._stale() and self._reading.acquire(blocking=False):
            try:
                if self._stale():  # another thread read while this one reached the lock
                    self._refresh()
            finally:
                self._reading.release()
        return job_id in self._over

    def _stale(self) -> bool:
        return self._read_at is None or self._clock() - self._read_at >= self.interval

    def _refresh(self) -> None:
        with self._lock:
            jobs = list(self._watched)
        self._read_at = self._clock()  # a failed read is not tried again by every caller at once
        if not jobs:
            return
        statuses = self._read(jobs)
        over = {job for job, status in zip(jobs, statuses, strict=True)
                if status is None or JobStatus(status).final}
        with self._lock:
            self._over = {job for job in over if job in self._watched}
