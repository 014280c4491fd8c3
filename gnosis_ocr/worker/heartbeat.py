"""Worker liveness in Redis, and recovery of the pages of workers that stopped beating.

A pool child killed mid-page is handled by Celery at once (acks_late +
reject_on_worker_lost requeue the message). A whole worker that vanishes (a
GPU host gone) leaves its messages unacknowledged until the broker's visibility
timeout, which must outlast the longest page and so cannot be the recovery
mechanism. Instead each worker beats every few seconds and lists its in-flight
pages; any live worker that sees a beat go stale requeues that worker's pages.
The original message's late redelivery is then harmless: a page is recorded once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import redis

from ..broker import OCR_PAGE_TASK
from ..job import now_rfc3339
from ..metrics import Metrics

log = logging.getLogger(__name__)

WORKERS_KEY = "gnosis:workers"
REAPER_LOCK = "gnosis:reaper"


def worker_name() -> str:
    return os.environ.get("GNOSIS_WORKER_NAME") or f"gnosis-{os.getpid()}@{socket.gethostname()}"


def _inflight_key(name: str) -> str:
    return f"gnosis:worker:{name}:inflight"


def _engines_key(name: str) -> str:
    return f"gnosis:worker:{name}:engines"


def inflight(job_id: str, page: int) -> tuple[str, str, str]:
    """This delivery's entry in the worker's in-flight hash: (key, field, value), written by the job store."""
    value = json.dumps({"pid": os.getpid(), "started_at": now_rfc3339()})
    return _inflight_key(worker_name()), f"{job_id}:{page}", value


def page_finished(client: redis.Redis, job_id: str, page: int) -> None:
    """Drop an in-flight entry on the paths that end a page without recording it."""
    try:
        client.hdel(_inflight_key(worker_name()), f"{job_id}:{page}")
    except redis.RedisError as exc:  # the reaper may requeue it; the page is still recorded once
        log.warning("could not clear in-flight page: %s", exc)


def engine_loaded(client: redis.Redis) -> None:
    """Called in a pool child once its engine is loaded: the worker's readiness counts these."""
    client.hset(_engines_key(worker_name()), str(os.getpid()), now_rfc3339())


class Heartbeat:
    def __init__(self, client: redis.Redis, app, *, queue: str, engine: str, concurrency: int,
                 interval: float) -> None:
        self.redis = client
        self.interval = interval
        self.app = app
        self.queue = queue
        self.name = worker_name()
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "engine": engine,
                     "concurrency": concurrency, "started_at": now_rfc3339()}
        self.metrics = Metrics(client)
        self._stop = threading.Event()

    def start(self) -> None:
        # Pool children may have loaded their engines before this runs: keep what they recorded.
        threading.Thread(target=self._run, name="gnosis-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.redis.zrem(WORKERS_KEY, self.name)
            self.redis.delete(f"gnosis:worker:{self.name}", _engines_key(self.name))
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
                self.reap()
            except redis.RedisError as exc:
                log.warning("heartbeat failed (Redis unreachable?): %s", exc)
            except Exception:
                # A silent heartbeat makes the other workers requeue this one's pages: never let it die.
                log.exception("heartbeat error")
            self._stop.wait(self.interval)

    def beat(self) -> None:
        loaded = self._live_engines()
        record = json.dumps({**self.info, "engines_loaded": loaded})
        pipe = self.redis.pipeline()
        pipe.set(f"gnosis:worker:{self.name}", record, ex=int(self.interval * 3) + 1)
        pipe.zadd(WORKERS_KEY, {self.name: time.time()})
        pipe.execute()

    def _live_engines(self) -> int:
        """Pool processes with a loaded engine; entries of replaced (crashed) children are dropped."""
        key = _engines_key(self.name)
        live = 0
        for raw in self.redis.hkeys(key):
            try:
                os.kill(int(raw), 0)
                live += 1
            except (ProcessLookupError, ValueError):
                self.redis.hdel(key, raw)
            except PermissionError:
                live += 1
        return live

    def reap(self) -> int:
        """Requeue the in-flight pages of workers whose beat is stale. One reaper at a time."""
        if not self.redis.set(REAPER_LOCK, self.name, nx=True, ex=max(int(self.interval), 1)):
            return 0
        stale_before = time.time() - 3 * self.interval
        requeued = 0
        for raw in self.redis.zrangebyscore(WORKERS_KEY, "-inf", stale_before):
            dead = raw.decode()
            pages = self.redis.hkeys(_inflight_key(dead))
            for entry in pages:
                job_id, page = entry.decode().rsplit(":", 1)
                self.app.send_task(OCR_PAGE_TASK, args=[job_id, int(page)], queue=self.queue)
                requeued += 1
            self.redis.delete(_inflight_key(dead), _engines_key(dead))
            self.redis.zrem(WORKERS_KEY, dead)
            if pages:
                log.warning("worker %s stopped beating; requeued %d page(s)", dead, len(pages))
                self.metrics.inc("gnosis_worker_recoveries_total", len(pages))
        return requeued
