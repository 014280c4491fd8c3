"""Final-state webhooks from the worker side: enqueue once per job, deliver with retries."""

from __future__ import annotations

import logging

from .. import keys
from ..broker import DELIVER_WEBHOOK_TASK, events_queue
from ..errors import BadRequest
from ..webhook import DeliveryFailed, DeliveryRejected, deliver
from . import outbox
from .runtime import Runtime

log = logging.getLogger(__name__)


def enqueue(rt: Runtime, job_id: str, callback_url: str | None) -> None:
    if not callback_url:
        return
    from .celery_app import app

    app.send_task(DELIVER_WEBHOOK_TASK, args=[job_id], queue=events_queue(rt.settings))


def attempt(rt: Runtime, job_id: str, number: int) -> bool:
    """One delivery. True when finished (delivered or given up: the outbox entry is settled); False when
    it should be retried."""
    done = _attempt(rt, job_id, number)
    if done:
        outbox.settle(rt.redis, job_id)
    return done


def _attempt(rt: Runtime, job_id: str, number: int) -> bool:
    job = rt.jobs.get(job_id)
    if job is None or not job.callback_url:
        return True
    url = job.callback_url
    record = keys.job(job_id)
    try:
        status = deliver(url, job.to_api(), secret=rt.settings.webhook_secret,
                         allow_private=rt.settings.webhook_allow_private, timeout=rt.settings.webhook_timeout)
    except BadRequest as exc:  # the host now resolves somewhere it must not go
        rt.redis.hset(record, mapping={"webhook_status": "refused", "webhook_attempts": number})
        log.warning("webhook for job %s refused: %s", job_id, exc.message)
        return True
    except DeliveryRejected as exc:
        rt.redis.hset(record, mapping={"webhook_status": "failed", "webhook_attempts": number})
        log.warning("webhook for job %s failed for good: %s", job_id, exc)
        return True
    except DeliveryFailed as exc:
        last = number >= rt.settings.webhook_max_attempts
        rt.redis.hset(record, mapping={"webhook_status": "failed" if last else "retrying",
                                       "webhook_attempts": number})
        log.warning("webhook for job %s failed (attempt %d): %s", job_id, number, exc)
        return last
    rt.redis.hset(record, mapping={"webhook_status": f"delivered:{status}", "webhook_attempts": number})
    return True


def enqueue_batch(rt: Runtime, batch_id: str) -> None:
    from ..broker import DELIVER_BATCH_WEBHOOK_TASK
    from .celery_app import app

    app.send_task(DELIVER_BATCH_WEBHOOK_TASK, args=[batch_id], queue=events_queue(rt.settings))


def attempt_batch(rt: Runtime, batch_id: str, number: int) -> bool:
    """One delivery of a final batch's webhook: True when finished (delivered or given up)."""
    from ..batch import BatchStore

    batches = BatchStore(rt.redis, ttl=rt.settings.job_ttl)
    batch = batches.get(batch_id)
    if batch is None or not batch.callback_url or not batch.final:
        outbox.settle(rt.redis, batch_id, outbox.BATCHES)
        return True
    try:
        status = deliver(batch.callback_url, batch.to_api(), secret=rt.settings.webhook_secret,
                         allow_private=rt.settings.webhook_allow_private, timeout=rt.settings.webhook_timeout,
                         kind="batch")
    except (BadRequest, DeliveryRejected) as exc:
        batches.note_webhook(batch_id, "failed", number)
        outbox.settle(rt.redis, batch_id, outbox.BATCHES)
        log.warning("webhook for batch %s failed for good: %s", batch_id, exc)
        return True
    except DeliveryFailed as exc:
        last = number >= rt.settings.webhook_max_attempts
        batches.note_webhook(batch_id, "failed" if last else "retrying", number)
        if last:
            outbox.settle(rt.redis, batch_id, outbox.BATCHES)
        log.warning("webhook for batch %s failed (attempt %d): %s", batch_id, number, exc)
        return last
    batches.note_webhook(batch_id, f"delivered:{status}", number)
    outbox.settle(rt.redis, batch_id, outbox.BATCHES)
    return True
