"""The webhook outbox: every final job with a callback is owed one delivery, whatever crashes when.

The job store's script that makes a job final also adds it to `keys.WEBHOOK_OUTBOX`, in the same atomic step;
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
from collections.abc import Callable
from dataclasses import dataclass

import redis

from .. import keys
from ..broker import DELIVER_BATCH_WEBHOOK_TASK, DELIVER_WEBHOOK_TASK, task_args

log = logging.getLogger(__name__)

BATCH = 200
"""Overdue entries handled per pass: a backlog after an outage drains over a few passes."""

SETTLED = ("delivered:", "failed", "refused")
"""`webhook_status` prefixes of a delivery that is over."""


@dataclass(frozen=True)
class Kind:
    """What owes webhooks: jobs, and batches (the same outbox mechanism, their own key and task)."""

    key: str
    task: str
    record: Callable[[str], str]


JOBS = Kind(keys.WEBHOOK_OUTBOX, DELIVER_WEBHOOK_TASK, keys.job)
BATCHES = Kind(keys.BATCH_OUTBOX, DELIVER_BATCH_WEBHOOK_TASK, keys.batch)


def postpone(client: redis.Redis, item_id: str, seconds: float, kind: Kind = JOBS) -> None:
    """The delivery is in hand for `seconds` more (a retry scheduled, or an attempt under way)."""
    now, _ = client.time()
    client.zadd(kind.key, {item_id: now + seconds}, xx=True)


def settle(client: redis.Redis, item_id: str, kind: Kind = JOBS) -> None:
    client.zrem(kind.key, item_id)


def republish(client: redis.Redis, app, *, queue: str, grace: float) -> int:
    """Publish again the deliveries overdue by `grace` that no queued or unacknowledged message holds;
    the number published."""
    return sum(_republish(client, app, queue=queue, grace=grace, kind=kind) for kind in (JOBS, BATCHES))


def _republish(client: redis.Redis, app, *, queue: str, grace: float, kind: Kind) -> int:
    now, _ = client.time()
    due = [raw.decode() for raw in client.zrangebyscore(kind.key, 0, now - grace, start=0, num=BATCH)]
    if not due:
        return 0
    held = _held(client, queue, kind.task)
    pipe = client.pipeline(transaction=False)
    for item_id in due:
        pipe.hmget(kind.record(item_id), "status", "callback_url", "webhook_status")
    published = 0
    for item_id, (status, callback, state) in zip(due, pipe.execute(), strict=True):
        if status is None or not callback or (state and state.decode().startswith(SETTLED)):
            settle(client, item_id, kind)
            continue
        if item_id not in held:
            app.send_task(kind.task, args=[item_id], queue=queue)
            published += 1
        client.zadd(kind.key, {item_id: now}, xx=True)  # due again one grace from now
    if published:
        log.warning("published %d owed webhook(s) again (their delivery task was never sent or was lost)",
                    published)
    return published


def _held(client: redis.Redis, queue: str, task: str) -> set[str]:
    """Ids with a delivery task waiting in the events queue or taken by a consumer."""
    held: set[str] = set()
    for raw in client.lrange(queue, 0, -1):
        held |= _ids_of(raw, task)
    for _, raw in client.hscan_iter("unacked", count=1000):
        try:
            held |= _ids_of(json.dumps(json.loads(raw)[0]).encode(), task)
        except (ValueError, IndexError, TypeError):
            continue
    return held


def _ids_of(raw: bytes, task: str) -> set[str]:
    args = task_args(raw, task)
    return {str(args[0])} if args else set()
