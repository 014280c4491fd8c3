"""Thin Celery tasks: everything they do lives in `runtime` and `page`."""

import contextlib
import logging
import os
import time

import redis
from billiard.exceptions import TimeLimitExceeded
from celery import signals
from celery.exceptions import Reject

from .. import redismemory
from ..broker import (
    DELIVER_BATCH_WEBHOOK_TASK,
    DELIVER_WEBHOOK_TASK,
    EXPAND_BATCH_TASK,
    OCR_PAGE_TASK,
    PRIORITY_STEPS,
    WARM_CACHE_TASK,
)
from . import batches, heartbeat, listings, notify, outbox, page, plan, probe, registry, runtime
from .celery_app import app

log = logging.getLogger(__name__)

REQUEUE_DELAY = 1.0
"""Seconds a page waits before its message goes back to the queue after a Redis error, so that a
failing Redis is not hammered by every worker thread at once."""


class PageTask(app.Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        # A hard time limit kills the pool process; Celery then acks the message and calls this in the
        # main process. Without it the job would stay "running" until its TTL.
        if isinstance(exc, TimeLimitExceeded) and len(args) >= 2:
            page.hard_timeout(runtime.get(), args[0], int(args[1]))


@app.task(name=OCR_PAGE_TASK, base=PageTask, bind=True)
def ocr_page(self, job_id: str, page_index: int, count: int = 1, aside_since: float | None = None) -> str:
    # The broker's tag lets the reaper return this very message if the whole worker dies.
    tag = (getattr(self.request, "properties", None) or {}).get("delivery_tag")
    try:
        # `count` > 1 only in messages queued by releases that grouped pages per task.
        verdicts = [page.run_page(runtime.get(), job_id, p, tag=tag, aside_since=aside_since)
                    for p in range(page_index, page_index + count)]
    except page.RequeuePage as exc:
        aside = isinstance(exc, page.StepAside)  # its bucket fails: behind every other page, not at its priority
        log.warning("%s; returning the page to the queue%s", exc, ", behind the others" if aside else "")
        time.sleep(REQUEUE_DELAY)  # back-off before the redelivery, not a synchronisation
        if aside and _step_aside(job_id, page_index, count, since=exc.since):
            return "deferred"
        raise Reject(str(exc), requeue=True) from None
    except Exception as exc:
        # Raised where nothing expects it (a bug, or the soft time limit outside the engine's call): the
        # message is acknowledged all the same, and the job would wait out GNOSIS_JOB_MAX_AGE.
        page.crashed(runtime.get(), job_id, page_index, exc)
        raise
    return verdicts[-1]


def _step_aside(job_id: str, page_index: int, count: int, *, since: float) -> bool:
    """Publish the page anew at the lowest priority, this message to be acknowledged: a page requeued
    as it is keeps its priority, and a small key's batch whose bucket fails for hours would come back
    ahead of every other key's pages each time. The new message carries when its bucket first failed
    it, which bounds how long it is handed back. False if it could not be published (then requeue)."""
    args = [job_id, page_index] if count == 1 else [job_id, page_index, count]
    try:
        app.send_task(OCR_PAGE_TASK, args=args, kwargs={"aside_since": since}, queue=runtime.get().settings.queue,
                      priority=PRIORITY_STEPS[-1])
    except Exception as exc:  # the broker failing too: the message goes back as it is
        log.warning("could not publish job %s page %d anew (%s); requeueing its message", job_id, page_index, exc)
        return False
    return True


@app.task(name=DELIVER_WEBHOOK_TASK, bind=True, ignore_result=True, max_retries=None)
def deliver_webhook(self, job_id: str) -> None:
    rt = runtime.get()
    if not notify.attempt(rt, job_id, self.request.retries + 1):
        countdown = rt.settings.webhook_backoff * 2 ** self.request.retries
        # The outbox is not to publish it again while this retry is pending.
        outbox.postpone(rt.redis, job_id, countdown + rt.settings.webhook_timeout)
        raise self.retry(countdown=countdown)


@app.task(name=DELIVER_BATCH_WEBHOOK_TASK, bind=True, ignore_result=True, max_retries=None)
def deliver_batch_webhook(self, batch_id: str) -> None:
    rt = runtime.get()
    if not notify.attempt_batch(rt, batch_id, self.request.retries + 1):
        countdown = rt.settings.webhook_backoff * 2 ** self.request.retries
        outbox.postpone(rt.redis, batch_id, countdown + rt.settings.webhook_timeout, outbox.BATCHES)
        raise self.retry(countdown=countdown)


@app.task(name=EXPAND_BATCH_TASK, bind=True, ignore_result=True)
def expand_batch(self, batch_id: str) -> str:
    rt = runtime.get()
    # Listed in this worker's in-flight hash like a page: if the worker dies mid-listing, the reaper
    # returns this very message and another light worker lists again (the made set skips what exists).
    tag = (getattr(self.request, "properties", None) or {}).get("delivery_tag")
    key, field, value = registry.entry(f"{listings.IN_FLIGHT_PREFIX}{batch_id}", 0, tag)
    try:
        rt.redis.hset(key, field, value)
        try:
            return batches.expand(rt, batch_id, app)
        finally:
            with contextlib.suppress(redis.RedisError):  # a stale entry is harmless: the message is settled
                rt.redis.hdel(key, field)
    except (batches.ListingInterrupted, redis.RedisError) as exc:
        # A task that raised would be acknowledged and the batch never listed: its message goes back.
        log.warning("%s; returning the listing to the queue", exc)
        time.sleep(REQUEUE_DELAY)  # back-off before the redelivery, not a synchronisation
        raise Reject(str(exc), requeue=True) from None


@app.task(name=WARM_CACHE_TASK, ignore_result=True)
def warm_cache() -> str:
    return runtime.get().warm_cache()


_heartbeat: heartbeat.Heartbeat | None = None
_probe: probe.Probe | None = None


@signals.worker_process_init.connect
def _load_engine_in_child(**_) -> None:
    # Prefork: loaded after the fork, once per pool process; never in the parent, which forks.
    # A batched (threads pool) worker loaded its engine before it started consuming.
    runtime.get().preload()


@signals.worker_init.connect
def _name_worker(**_) -> None:
    # Main process, before the pool forks: `celery -A` workers get a unique id as `gnosis-ocr worker` does.
    current = plan.current()
    registry.ensure_worker_id("light-" if current is not None and current.light else "")


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **_) -> None:
    global _heartbeat
    rt = runtime.get()
    redismemory.warn_if_unsafe(rt.redis, f"worker {registry.worker_id()}")
    # Readiness counts loaded engines: one per pool process, or the one batched engine of a threads pool.
    concurrency = rt.expected_engines(getattr(getattr(sender, "pool", None), "limit", 0) or 0)
    _heartbeat = heartbeat.Heartbeat(rt, app, concurrency=concurrency)
    _heartbeat.start()
    port = rt.settings.worker_port
    if port:
        global _probe
        _probe = probe.Probe(rt.redis, port=port, worker=registry.worker_id(), concurrency=concurrency,
                             dead=lambda: rt.engine_dead)
        _probe.start()


@signals.worker_shutting_down.connect
def _hand_back_listings(**_) -> None:
    batches.stopping.set()


@signals.worker_shutdown.connect
def _stop_heartbeat(**_) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
    if _probe is not None:
        _probe.stop()


@signals.worker_process_shutdown.connect
def _forget_child_metrics(pid=None, **_) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())
