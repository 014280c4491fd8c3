"""Batch listings that no message will ever run: found and published again, once per cluster.

The API writes a batch, then publishes its listing (`gnosis.expand_batch`) to the light workers' queue.
The message can be lost as a page's can (kombu pops it, then an out-of-memory or READONLY reply refuses
its unacked record; the API dies between the write and the publish), and then the batch would stay
`queued` for ever: nothing else lists it.

The housekeeper looks at batches still unlisted after GNOSIS_RECONCILE_GRACE (the BATCHES_UNLISTED
index): one whose listing is in no queue list, no unacknowledged entry and no worker's in-flight hash,
on two passes in a row, is published again. A message some consumer holds, however old, counts as
held (kombu returns it after its visibility timeout if that consumer died): two listings of one batch
at once must not happen, a late one is only late.
"""

from __future__ import annotations

import logging

import redis

from .. import keys
from ..broker import EXPAND_BATCH_TASK, task_args
from .reconcile import in_flight_entries, queued_messages, unacked_messages

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
        lost = unlisted - self._held()
        again = lost & self._suspects
        self._suspects = lost - again
        for batch_id in sorted(again):
            self.app.send_task(EXPAND_BATCH_TASK, args=[batch_id], queue=self.queue)
        if again:
            log.warning("published the listing of %d batch(es) again (no message or worker had it): %s",
                        len(again), ", ".join(sorted(again)[:10]))
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

    def _held(self) -> set[str]:
        """Batches whose listing a message or a worker has: queued, unacknowledged, or running."""
        messages = [*queued_messages(self.redis, self.queue), *(raw for _, raw in unacked_messages(self.redis))]
        held = {str(args[0]) for raw in messages if (args := task_args(raw, EXPAND_BATCH_TASK))}
        return held | {name[len(IN_FLIGHT_PREFIX):] for name, _ in in_flight_entries(self.redis)
                       if name.startswith(IN_FLIGHT_PREFIX)}
