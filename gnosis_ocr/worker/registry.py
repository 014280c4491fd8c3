"""Which worker is running which page, and recovery of the pages of workers that died.

Every worker start gets its own id (`GNOSIS_WORKER_ID`, made once in the worker's main process and
inherited by its pool processes), so two containers with pid 1 and one hostname never share an
entry. A worker is alive while its record key exists: the key expires on Redis's clock, so hosts
whose clocks disagree cannot declare each other dead.

Each worker lists its in-flight pages in a hash, with the broker's delivery tag of each. When a
worker's record has expired, any live worker returns that worker's unacknowledged messages to their
queue (exactly what the broker's visibility timeout would do, hours earlier), so a crash costs one
redelivery of each page and one attempt, never a second copy.

A live worker keeps its hash true (`prune`): the reconciler takes an entry for a page being run, so
an entry left behind by a delivery that is over would hide a lost page until the broker's visibility
timeout. A failover leaves such entries: the promoted replica had a page's claim, not its ending.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable

import redis

from .. import keys
from ..broker import OCR_PAGE_TASK
from ..job import now_rfc3339

log = logging.getLogger(__name__)


def assign_worker_id(role: str = "") -> str:
    """A new id for this worker start, exported so that pool processes report under it."""
    worker = f"gnosis-{role}{os.getpid()}@{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    os.environ["GNOSIS_WORKER_ID"] = worker
    os.environ["GNOSIS_WORKER_ID_OWNER"] = str(os.getpid())
    return worker


def ensure_worker_id(role: str = "") -> str:
    """In a worker's main process: its own id, never one inherited from the environment that
    started it (a container image or a parent that set it would give every replica the same id)."""
    if os.environ.get("GNOSIS_WORKER_ID_OWNER") != str(os.getpid()):
        return assign_worker_id(role)
    return os.environ["GNOSIS_WORKER_ID"]


def worker_id() -> str:
    return os.environ.get("GNOSIS_WORKER_ID") or assign_worker_id()


def entry(job_id: str, page: int, tag: str | None) -> tuple[str, str, str]:
    """This delivery's entry in the worker's in-flight hash: (key, field, value), written by the job store."""
    value = json.dumps({"pid": os.getpid(), "started_at": now_rfc3339(), "tag": tag})
    return keys.worker_inflight(worker_id()), f"{job_id}:{page}", value


def clear(client: redis.Redis, job_id: str, page: int) -> None:
    """Drop an in-flight entry on the paths that end a page without recording it."""
    try:
        client.hdel(keys.worker_inflight(worker_id()), f"{job_id}:{page}")
    except redis.RedisError as exc:  # harmless: a dead worker's finished message is no longer unacked
        log.warning("could not clear in-flight page: %s", exc)


_DROP_UNCHANGED = """
local dropped = {}
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    dropped[#dropped + 1] = ARGV[i]
  end
end
return dropped
"""


def prune(client: redis.Redis, held: Callable[[], Iterable[str]]) -> list[str]:
    """Drop this worker's in-flight entries that no delivery it still holds wrote; the fields dropped.
    `held()`: the delivery tags of every message the worker holds (`held_tags`).

    A delivery writes its entry while the worker holds its message and removes it before letting the
    message go, so an entry whose tag is not held *after* the entries were read belongs to a delivery
    that is over, and whose removal was lost (or never came, on a path that returned its message). Each is
    dropped only if unchanged since it was read: a new delivery of the same page may have written it again
    meanwhile. Entries without a tag are left alone."""
    key = keys.worker_inflight(worker_id())
    entries = client.hgetall(key)
    if not entries:
        return []
    tags = set(held())
    stale = [(field, value) for field, value in entries.items() if (tag := _tag(value)) and tag not in tags]
    if not stale:
        return []
    dropped = client.eval(_DROP_UNCHANGED, 1, key, *[part for pair in stale for part in pair])
    return [field.decode() for field in dropped]


def held_tags() -> set[str]:
    """The delivery tags of every message this worker holds, from Celery's own bookkeeping in its main
    process: a request is listed from its receipt until its task has ended, whichever pool runs it. (A
    lost broker connection also unlists those not yet running; kombu puts their messages back in the
    queue then, so a page of theirs that runs after all is not taken for lost.)"""
    from celery.worker import state

    requests = state.requests.copy()  # one C call: the consumer's thread adds and removes meanwhile
    return {tag for request in requests.values() if (tag := getattr(request.message, "delivery_tag", None))}


def _tag(value: bytes) -> str | None:
    try:
        return json.loads(value).get("tag")
    except (ValueError, AttributeError):
        return None


def engine_loaded(client: redis.Redis) -> None:
    """Called in a pool process once its engine is loaded: the worker's readiness counts these."""
    client.hset(keys.worker_engines(worker_id()), str(os.getpid()), now_rfc3339())


def register(client: redis.Redis, worker: str, record: dict, *, ttl: float) -> None:
    """One beat: the record that says this worker is alive, for `ttl` seconds of Redis's clock."""
    pipe = client.pipeline()
    pipe.set(keys.worker(worker), json.dumps(record), px=max(int(ttl * 1000), 1))
    pipe.zadd(keys.WORKERS, {worker: 0}, nx=True)
    pipe.execute()


def unregister(client: redis.Redis, worker: str) -> None:
    client.zrem(keys.WORKERS, worker)
    client.delete(keys.worker(worker), keys.worker_engines(worker))


def housekeeper(client: redis.Redis, seconds: float) -> bool:
    """True for the one worker, cluster-wide, that does the housekeeping of the next `seconds`."""
    return bool(client.set(keys.REAPER_LOCK, worker_id(), nx=True, px=max(int(seconds * 1000), 1)))


def reap(client: redis.Redis, app, *, queue: str) -> int:
    """Return the in-flight pages of dead workers to the queue; the number returned."""
    requeued = 0
    for raw in client.zrange(keys.WORKERS, 0, -1):
        dead = raw.decode()
        if client.exists(keys.worker(dead)):
            continue
        pages = client.hgetall(keys.worker_inflight(dead))
        returned = sum(_requeue(client, app, queue, field.decode(), value) for field, value in pages.items())
        client.delete(keys.worker_inflight(dead), keys.worker_engines(dead))
        client.zrem(keys.WORKERS, dead)
        if pages:
            log.warning("worker %s stopped beating; requeued %d page(s) (%d listed)", dead, returned, len(pages))
        requeued += returned
    return requeued


def _requeue(client: redis.Redis, app, queue: str, field: str, value: bytes) -> bool:
    tag = _tag(value)
    if tag:
        # The original message, back from the broker's unacknowledged set: no copy is made. If it is no
        # longer there, it was already acknowledged or returned, and there is nothing to do.
        with app.connection_for_write() as conn:
            qos = conn.default_channel.qos
            if not client.hexists(qos.unacked_key, tag):
                return False
            qos.restore_by_tag(tag)
        return True
    # An entry written by a release that did not record delivery tags.
    job_id, page = field.rsplit(":", 1)
    app.send_task(OCR_PAGE_TASK, args=[job_id, int(page)], queue=queue)
    return True
