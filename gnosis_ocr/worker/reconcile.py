"""Pages that no message will ever run: found and put back in the queue, once per cluster.

A page can lose its message without any worker crashing where the reaper would see it. kombu's Redis
transport pops a message (BRPOP) and only then records it as unacknowledged: an out-of-memory reply, a
failover's READONLY or a kill in between leaves it in neither place, and START_PAGE never ran, so no
in-flight entry names it. The API writes a job before it publishes the job's pages: dying in between
leaves a job with fewer messages than pages. Either way the job would wait until GNOSIS_JOB_MAX_AGE.

The housekeeper looks at live jobs older than GNOSIS_RECONCILE_GRACE: a page not recorded, with no
message in the queue's lists nor in the unacknowledged set, and no worker's in-flight entry, is lost.
In-flight entries can be trusted because every live worker drops its own that no delivery it holds
wrote (`registry.prune`). Only a page found lost on two passes in a row is published again (a message
between BRPOP and its unacked record is gone from both for microseconds, not a whole pass). A redelivery
is safe whatever happens: START_PAGE counts the attempt, and a page is recorded once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import redis

from .. import keys
from ..broker import OCR_PAGE_TASK, page_priority, queue_keys, task_args

log = logging.getLogger(__name__)

UNACKED_KEY = "unacked"
"""kombu's Redis transport: delivery tag -> [message, exchange, routing key] of every unacked message."""

UNACKED_INDEX_KEY = "unacked_index"
"""kombu's Redis transport: delivery tag -> the time it was delivered (unix seconds)."""

SCAN_CHUNK = 1000
"""Messages read per round trip while listing a queue: a long queue is read in pages, never at once."""


class Reconciler:
    def __init__(self, client: redis.Redis, app, *, queue: str, grace: float) -> None:
        self.redis = client
        self.app = app
        self.queue = queue
        self.grace = grace
        self._suspects: set[tuple[str, int]] = set()

    def run(self) -> int:
        """One pass; the number of pages published again."""
        unrecorded, owners = self._unrecorded()
        if not unrecorded:
            self._suspects.clear()
            return 0
        accounted, stale = self._accounted_for()
        lost = unrecorded - accounted
        again = lost & self._suspects
        self._suspects = lost - again
        priorities = self._priorities({job_id: owners[job_id] for job_id, page in again if (job_id, page) not in stale})
        restored = 0
        for job_id, page in sorted(again):
            tag = stale.get((job_id, page))
            if tag is not None:  # the original, back from a consumer that no longer holds it: no copy is made
                restore(self.app, tag)
                restored += 1
            else:  # at its submitter's priority now: a copy without one would go ahead of every key's pages
                self.app.send_task(OCR_PAGE_TASK, args=[job_id, page], queue=self.queue,
                                   priority=priorities[job_id])
        if again:
            log.warning("published %d lost page(s) again (%d of them the unacknowledged original; no worker was "
                        "running them): %s", len(again), restored, ", ".join(f"{j}:{p}" for j, p in sorted(again)[:10]))
        return len(again)

    def _unrecorded(self) -> tuple[set[tuple[str, int]], dict[str, str]]:
        """Pages not yet recorded of live jobs older than the grace, and those jobs' owners."""
        seconds, micros = self.redis.time()
        cutoff_ms = int(seconds * 1000 + micros // 1000 - self.grace * 1000)
        job_ids = [raw.decode() for raw in self.redis.zrangebyscore(keys.LIVE_JOBS, 0, cutoff_ms)]
        pipe = self.redis.pipeline(transaction=False)  # two reads a job, one round trip for all
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), "status", "pages_total", "owner")
            pipe.hkeys(keys.job_pages(job_id))
        replies = pipe.execute() if job_ids else []
        out: set[tuple[str, int]] = set()
        owners: dict[str, str] = {}
        for job_id, (status, total, owner), done in zip(job_ids, replies[::2], replies[1::2], strict=True):
            if status in (b"queued", b"running") and total is not None:
                owners[job_id] = (owner or b"").decode()
                # The hash also flags each page cut short (`t:<page>`): only the pages' own fields say
                # which are recorded. Read as numbers, one such flag failed every pass, so no lost page was
                # published again while any live job had a truncated page.
                recorded = {int(p) for p in done if p.isdigit()}
                out |= {(job_id, page) for page in range(int(total)) if page not in recorded}
        return out, owners

    def _priorities(self, owners: dict[str, str]) -> dict[str, int]:
        """Each job's page priority from its owner's backlog now, as the API and the lister give it."""
        names = sorted(set(owners.values()))
        backlogs = dict(zip(names, self.redis.mget([keys.owner_pages(o) for o in names]), strict=True)) if names else {}
        return {job_id: page_priority(int(backlogs[owner] or 0)) for job_id, owner in owners.items()}

    def _accounted_for(self) -> tuple[set[tuple[str, int]], dict[tuple[str, int], str]]:
        """Every page some message or worker still has: queued, in flight, or unacknowledged for less
        than the grace. Unacknowledged longer, and in no worker's in-flight hash, is a message its
        consumer took and died holding before START_PAGE ran: returned with its delivery tag."""
        found: set[tuple[str, int]] = set()
        stale_tags = unacked_since(self.redis, self.grace)
        held: dict[tuple[str, int], str] = {}
        for raw in queued_messages(self.redis, self.queue):
            found |= _pages_of(raw)
        for tag, raw in unacked_messages(self.redis):
            pages = _pages_of(raw)
            if tag not in stale_tags:
                found |= pages
            else:
                held.update({page: tag.decode() for page in pages})
        found |= {(name, int(page)) for name, page in in_flight_entries(self.redis) if page.isdigit()}
        return found, {page: tag for page, tag in held.items() if page not in found}


def unacked_since(client: redis.Redis, seconds: float) -> set[bytes]:
    """Delivery tags of the messages unacknowledged for longer than `seconds`, on Redis's clock."""
    now, _ = client.time()
    return set(client.zrangebyscore(UNACKED_INDEX_KEY, 0, now - seconds))


def restore(app, tag: str) -> None:
    """An unacknowledged message back to its queue, as kombu's visibility timeout would return it."""
    with app.connection_for_write() as conn:
        conn.default_channel.qos.restore_by_tag(tag)


def queued_messages(client: redis.Redis, queue: str) -> Iterator[bytes]:
    """Every message waiting in a queue's lists, read a page at a time (a long queue is never held whole)."""
    for key in queue_keys(queue):
        start = 0
        while chunk := client.lrange(key, start, start + SCAN_CHUNK - 1):
            yield from chunk
            start += SCAN_CHUNK


def unacked_messages(client: redis.Redis) -> Iterator[tuple[bytes, bytes]]:
    """(delivery tag, message as a queue's list holds it) of every unacknowledged message; entries that
    do not parse are left out."""
    for tag, raw in client.hscan_iter(UNACKED_KEY, count=SCAN_CHUNK):
        try:
            message = json.dumps(json.loads(raw)[0]).encode()
        except (ValueError, IndexError, TypeError):
            continue
        yield tag, message


def in_flight_entries(client: redis.Redis) -> Iterator[tuple[str, str]]:
    """(name, page) of every worker's in-flight entry: a job id and its page, or a listing's
    `batch-<id>` and 0."""
    for key in client.scan_iter(keys.WORKER_INFLIGHTS, count=SCAN_CHUNK):
        for field in client.hkeys(key):
            name, _, page = field.decode().rpartition(":")
            yield name, page


def _pages_of(raw: bytes) -> set[tuple[str, int]]:
    """The (job, page) pairs a queued page message runs; nothing for other messages or bad JSON."""
    args = task_args(raw, OCR_PAGE_TASK)
    try:
        job_id, page = str(args[0]), int(args[1])
        count = int(args[2]) if len(args) > 2 else 1  # messages of releases that grouped pages
    except (TypeError, IndexError, ValueError):
        return set()
    return {(job_id, p) for p in range(page, page + count)}
