"""The HTTP API: a thin Flask app that checks documents, records jobs and enqueues pages.

It never imports torch, transformers or an OCR engine; the tests assert it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import redis
from flask import Flask, current_app

from .. import inputstore, redismemory, replication
from ..broker import make_producer, queue_keys
from ..errors import Unavailable
from ..job import JobStore
from ..metrics import Metrics
from ..options import WorkerLanguages
from ..redisconn import connect, is_sentinel, sentinels
from ..settings import Settings

__all__ = ["create_app", "ctx"]

log = logging.getLogger(__name__)

DEPTH_TTL = 0.25
"""Seconds a process trusts its last reading of the queue depth."""

MAX_FORM_PARTS = 16
"""Parts in one multipart submission (the file, `callback_url`, room for clients' extras)."""

MAX_FORM_FIELD_BYTES = 256 * 1024
"""Bytes in one non-file form field (Werkzeug also applies it to each read of a file part, so it stays
well above its 64 KiB read size)."""


@dataclass
class ApiContext:
    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    producer: object
    metrics: Metrics
    memory: redismemory.MemoryGauge
    languages: WorkerLanguages
    acceptance: replication.Acceptance
    _depth: tuple[float, int] = (0.0, 0)
    _depth_lock: threading.Lock = field(default_factory=threading.Lock)

    def queue_depth(self) -> int:
        """Pages waiting, read from Redis at most every DEPTH_TTL seconds per process.

        A round trip per submission would cost a fifth of the API's throughput; between reads this
        process counts what it adds itself (`enqueued`), so the bound stays conservative for its own
        traffic.
        """
        now = time.monotonic()
        if now - self._depth[0] > DEPTH_TTL:
            fresh = queue_length(self.redis, self.settings.queue)  # outside the lock: others keep going
            with self._depth_lock:
                self._depth = (now, fresh)
        with self._depth_lock:
            return self._depth[1]

    def confirm_accepted(self, what: str) -> None:
        """Before a 202: every write so far is on the replicas GNOSIS_ACCEPT_REPLICAS wants, or Unavailable
        (`redis_unreplicated`), counted, for the caller to remove what it wrote."""
        self._confirm(what, change=False)

    def confirm_changed(self, what: str) -> None:
        """Before the 2xx of a cancel or a deletion: the same confirmation; short of it, Unavailable asks the
        client to send the change again (it stays on the primary, and repeating it is safe)."""
        self._confirm(what, change=True)

    def _confirm(self, what: str, *, change: bool) -> None:
        try:
            self.acceptance.require(what=what, change=change)
        except Unavailable:  # replicas fell short (a Redis that does not answer raises RedisError instead)
            self.metrics.inc("gnosis_submissions_unreplicated_total", kind=what)
            raise

    def enqueued(self, pages: int, *, since: float) -> None:
        """`pages` were published, starting at `since` (monotonic): added to the last reading unless that
        reading was taken since, when it may count them already (adding them twice refused submissions
        to a queue that had room)."""
        with self._depth_lock:
            fetched_at, depth = self._depth
            if fetched_at <= since:
                self._depth = (fetched_at, depth + pages)


def _sentinel_check(client: redis.Redis, settings: Settings) -> replication.SentinelCheck | None:
    if not is_sentinel(settings.redis_url) or settings.accept_replicas != replication.CONNECTED:
        return None
    master, clients = sentinels(settings.redis_url, timeout=settings.accept_replicas_wait)
    return replication.SentinelCheck(client, master, clients)


def queue_length(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a queue, over all its priority lists."""
    pipe = client.pipeline(transaction=False)
    for key in queue_keys(queue):
        pipe.llen(key)
    return sum(pipe.execute())


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    # A submission is one file and a few small fields: refuse anything else early and cheaply.
    app.config["MAX_FORM_PARTS"] = MAX_FORM_PARTS
    app.config["MAX_FORM_MEMORY_SIZE"] = MAX_FORM_FIELD_BYTES
    app.json.sort_keys = False
    client = connect(
        settings.redis_url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=30,
        # Every open long-poll holds a pub/sub connection: room for each connection the process serves,
        # plus the short calls beside them (redis-py's default pool stops at 100).
        max_connections=2 * settings.api_connections,
    )
    app.extensions["gnosis"] = ApiContext(
        settings=settings,
        redis=client,
        jobs=JobStore(client, ttl=settings.job_ttl, max_attempts=settings.page_max_attempts,
                      inputs=inputstore.from_setting(settings.input_store, client)),
        producer=make_producer(settings),
        metrics=Metrics(client, background=True),
        memory=redismemory.MemoryGauge(client),
        languages=WorkerLanguages(client),
        acceptance=replication.Acceptance(client, settings.accept_replicas, settings.accept_replicas_wait,
                                          primary_check=_sentinel_check(client, settings)),
    )
    redismemory.warn_if_unsafe(client, "api")
    app.extensions["gnosis"].acceptance.warn_if_short("api")
    if settings.api_key_hashes:
        log.info("api: API keys are on (%d key(s)); requests without one get 401", len(settings.api_key_hashes))
    else:
        log.warning("api: API keys are off (GNOSIS_API_KEYS is empty): anyone who reaches this port may submit")

    from . import batches, cache, errors, jobs, ops, ui

    errors.register(app)

    @app.after_request
    def _nosniff(response):
        # Results are model output: a browser must never guess they are HTML.
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    app.register_blueprint(jobs.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(cache.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(ui.bp)
    return app


def ctx() -> ApiContext:
    return current_app.extensions["gnosis"]
