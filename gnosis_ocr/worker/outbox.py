"""The webhook outbox: every final job with a callback is owed one delivery, whatever crashes when.

The job store's script that makes a job final also adds it to `OUTBOX_KEY`, in the same atomic step;
whoever made it final then publishes the delivery task. A process killed between the two (or a broker
that refused the publish) leaves the job in the outbox, and the housekeeper publishes it again once it
is overdue by GNOSIS_RECONCILE_GRACE. The delivery task moves an entry's due time past each retry it
schedules and removes it when the delivery is settled (delivered, refused, or given up), so a slow
receiver being retried is not published twice. Delivery is at least once: receivers tell a repeat by
`X-Gnosis-Delivery`, the same for every attempt of one event.
"""

from __future__ import annotations

import json
import logging

import redis

from ..broker import DELIVER_WEBHOOK_TASK, task_args
from ..job import OUTBOX_KEY, JobStore

log = logging.getLogger(__name__)

BATCH = 200
"""Overdue entries handled per pass: a backlog after an outage drains over a few passes."""

SETTLED = ("delivered:", "failed", "refused")
"""`webhook_status` prefixes of a delivery that is over."""


def postpone(client: redis.Redis, job_id: str, seconds: float) -> None:
    """The delivery is in hand for `seconds` more (a retry scheduled, or an attempt under way)."""
    now, _ = client.time()
    client.zadd(OUTBOX_KEY, {job_id: now + seconds}, xx=True)


def settle(client: redis.Redis, job_id: str) -> None:
    client.zrem(OUTBOX_KEY, job_id)


def republish(client: redis.Redis, app, *, queue: str, grace: float) -> int:
    """Publish again the deliveries overdue by `grace` that no queued or unacknowledged message holds;
    the number published."""
    now, _ = client.time()
    due = [raw.decode() for raw in client.zrangebyscore(OUTBOX_KEY, 0, now - grace, start=0, num=BATCH)]
    if not due:
        return 0
    held = _held(client, queue)
    pipe = client.pipeline(transaction=False)
    for job_id in due:
        pipe.hmget(JobStore.keys(job_id)["record"], "status", "callback_url", "webhook_status")
    published = 0
    for job_id, (status, callback, state) in zip(due, pipe.execute(), strict=True):
        if status is None or not callback or (state and state.decode().startswith(SETTLED)):
            settle(client, job_id)
            continue
        if job_id not in held:
            app.send_task(DELIVER_WEBHOOK_TASK, args=[job_id], queue=queue)
            published += 1
        client.zadd(OUTBOX_KEY, {job_id: now}, xx=True)  # due again one grace from now
    if published:
        log.warning("published %d owed webhook(s) again (their delivery task was never sent or was lost)",
                    published)
    return published


def _held(client: redis.Redis, queue: str) -> set[str]:
    """Jobs with a delivery task waiting in the events queue or taken by a consumer."""
    held: set[str] = set()
    for raw in client.lrange(queue, 0, -1):
        held |= _jobs_of(raw)
    for _, raw in client.hscan_iter("unacked", count=1000):
        try:
            held |= _jobs_of(json.dumps(json.loads(raw)[0]).encode())
        except (ValueError, IndexError, TypeError):
            continue
    return held


def _jobs_of(raw: bytes) -> set[str]:
    args = task_args(raw, DELIVER_WEBHOOK_TASK)
    return {str(args[0])} if args else set()
