"""Whether the jobs of a worker's pages in flight are still wanted (worker/watch.py), on real job records in
a real Redis (a private one where it must go down) and a clock the test moves: every page asks four times a
second, Redis is read once."""

from __future__ import annotations

import contextlib

import pytest
import redis

from gnosis_ocr.job import JobStore
from gnosis_ocr.worker.watch import JobWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(redis_url):
    return JobStore(redis.Redis.from_url(redis_url), ttl=3600, max_attempts=3)


def counted(read):
    reads: list[int] = []

    def wrapped(job_ids):
        reads.append(len(job_ids))
        return read(job_ids)

    return wrapped, reads


def test_pages_in_flight_share_one_read_of_their_jobs_an_interval(store):
    clock = Clock()
    read, reads = counted(store.statuses)
    watch = JobWatch(read, interval=1.0, clock=clock)
    jobs = [store.create(data=b"x", kind="png", pages=1).id for _ in range(128)]
    with watching_all(watch, jobs):
        for _ in range(20):  # five seconds of pages asking four times a second each
            asked = [watch.over(job) for job in jobs]
            assert not any(asked)
            clock.now += 0.25
    assert reads == [128] * 5, "one read of all 128 jobs a second, where each page read its own 2,560 times"


def test_a_cancelled_or_deleted_job_is_over_at_the_next_read_and_the_others_are_not(store):
    clock = Clock()
    watch = JobWatch(store.statuses, interval=1.0, clock=clock)
    cancelled, deleted, running = (store.create(data=b"x", kind="png", pages=1).id for _ in range(3))
    with watching_all(watch, [cancelled, deleted, running]):
        assert not watch.over(running)
        store.cancel(cancelled)
        store.delete(deleted)
        clock.now += 0.5
        assert not watch.over(cancelled), "read again before the interval"
        clock.now += 0.5
        assert watch.over(cancelled) and watch.over(deleted) and not watch.over(running)


def test_a_failed_read_reaches_the_one_caller_that_made_it_and_is_tried_again_an_interval_later(tmp_path):
    from harness.redisproc import PrivateRedis

    server = PrivateRedis(tmp_path / "redis").start()  # append-only: the jobs outlive its restart
    try:
        store = JobStore(redis.Redis.from_url(server.url, socket_connect_timeout=0.5), ttl=3600, max_attempts=3)
        clock = Clock()
        read, reads = counted(store.statuses)
        watch = JobWatch(read, interval=1.0, clock=clock)
        cancelled, running = (store.create(data=b"x", kind="png", pages=1).id for _ in range(2))
        with watching_all(watch, [cancelled, running]):
            store.cancel(cancelled)
            assert watch.over(cancelled)
            server.stop()
            clock.now += 1.0
            with pytest.raises(redis.ConnectionError):
                watch.over(running)
            # Until the interval has passed, every other page answers from the last read, without a call.
            assert watch.over(cancelled) and not watch.over(running)
            assert len(reads) == 2
            server.start()
            clock.now += 1.0
            assert watch.over(cancelled) and not watch.over(running)
            assert len(reads) == 3
    finally:
        server.stop()


def test_a_job_no_page_watches_any_more_is_neither_read_nor_remembered(store):
    clock = Clock()
    read, reads = counted(store.statuses)
    watch = JobWatch(read, interval=1.0, clock=clock)
    job = store.create(data=b"x", kind="png", pages=2).id
    with watch.watching(job):
        with watch.watching(job):  # two pages of one job: it stays watched until the last one leaves
            store.cancel(job)
            assert watch.over(job)
        clock.now += 1.0
        assert watch.over(job)
    clock.now += 1.0
    assert not watch.over(job)
    assert reads == [1, 1], "nothing is read with no page in flight"


def watching_all(watch: JobWatch, jobs: list[str]) -> contextlib.ExitStack:
    """Every job of `jobs` watched for the block, as their pages' threads do."""
    stack = contextlib.ExitStack()
    for job in jobs:
        stack.enter_context(watch.watching(job))
    return stack
