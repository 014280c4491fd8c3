"""Batch listings that no message will ever run: found and published again, once per cluster.

The API writes a batch, then publishes its listing (`gnosis.expand_batch`) to the light workers' queue.
The message can be lost as a page's can (kombu pops it, then an out-of-memory or READONLY reply refuses
its unacked record; the API dies between the write and the publish), and then the batch would stay
`queued` for ever: nothing else lists it.

The housekeeper looks at batches still unlisted after GNOSIS_RECONCILE_GRACE (the BATCHES_UNLISTED
index): one whose listing is in no queue list and no worker's in-flight hash, on two passes in a row, is
listed again. If its message is unacknowledged, delivered more than the grace ago, that message itself
goes back to the queue (no copy is made); else a new one is published.

An unacknowledged message with no in-flight entry is one that no listing runs: a listing writes its
entry as it starts (a light worker starts each message it takes at once), and its worker drops the
entries of deliveries it no longer holds. A failover to a replica that lagged leaves such messages: the
replica had the listing's delivery, not its end. Counting them as held left the batch unlisted until
the broker's visibility timeout (13 minutes by default). A listing run twice at once costs bucket reads,
never a document counted twice: a document's job is added to its batch once (`BatchStore.add_job`).
"""

from __future__ import annotations

import logging

import redis

from .. import keys
from ..broker import EXPAND_BATCH_TASK, task_args
from .reconcile import in_flight_entries, queued_messages, restore, unacked_messages, unacked_since

log = logging.getLogger(__name__)

IN_FLIGHT_PREFIX = "batch-"
"""How a listing names itself in its worker's in-flight hash (`batch-<id>:0`), beside the pages."""


class Listings:
    def __init__(self, client: redis.Redis, app, *, queue: str, grace: float) -> None:
        self.redis = client
        self.app = app
        self.queue = queue  # the light workers' queue, where listings go
        self.grace = grace
        self._suspects: set[str] = set()

    def run(self) -> int:
        """One pass; the number of listings published again."""
        unlisted = self._unlisted()
        if not unlisted:
            self._suspects.clear()
            return 0
        held, stale = self._held()
        lost = unlisted - held
        again = lost & self._suspects
        self._suspects = lost - again
        restored = 0
        for batch_id in sorted(again):
            if (tag := stale.get(batch_id)) is not None:
                restore(self.app, tag)
                restored += 1
            else:
                self.app.send_task(EXPAND_BATCH_TASK, args=[batch_id], queue=self.queue)
        if again:
            log.warning("published the listing of %d batch(es) again (%d of them the unacknowledged original; "
                        "no worker was listing them): %s", len(again), restored, ", ".join(sorted(again)[:10]))
        return len(again)

    def _unlisted(self) -> set[str]:
        """Live batches created more than the grace ago whose listing has not finished; the index's other
        entries (a batch gone or ended, whose entry outlived it) are dropped."""
        now, _ = self.redis.time()
        ids = [raw.decode() for raw in self.redis.zrangebyscore(keys.BATCHES_UNLISTED, 0, now - self.grace)]
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hmget(keys.batch(batch_id), "status", "listed")
        out, stale = set(), []
        for batch_id, (status, listed) in zip(ids, pipe.execute() if ids else [], strict=True):
            if status in (b"queued", b"running") and listed != b"1":
                out.add(batch_id)
            else:
                stale.append(batch_id)
        if stale:
            self.redis.zrem(keys.BATCHES_UNLISTED, *stale)
        return out

    def _held(self) -> tuple[set[str], dict[str, str]]:
        """Batches whose listing a message or a worker has: queued, unacknowledged for less than the
        grace, or running; and, of the others, those whose message has been unacknowledged longer, with
        its delivery tag."""
        stale_tags = unacked_since(self.redis, self.grace)
        held = {batch_id for raw in queued_messages(self.redis, self.queue) if (batch_id := _batch_of(raw))}
        old: dict[str, str] = {}
        for tag, raw in unacked_messages(self.redis):
            if (batch_id := _batch_of(raw)) is None:
                continue
            if tag in stale_tags:
                old[batch_id] = tag.decode()
            else:
                held.add(batch_id)
        held |= {name[len(IN_FLIGHT_PREFIX):] for name, _ in in_flight_entries(self.redis)
                 if name.startswith(IN_FLIGHT_PREFIX)}
        return held, {batch_id: tag for batch_id, tag in old.items() if batch_id not in held}


def _batch_of(raw: bytes) -> str | None:
    """The batch a queued listing message lists; None for other messages."""
    args = task_args(raw, EXPAND_BATCH_TASK)
    return str(args[0]) if args else None
