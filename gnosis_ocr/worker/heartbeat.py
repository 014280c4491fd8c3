"""The worker's beat: says it is alive and ready, and runs the cluster's housekeeping.

A pool process killed mid-page is handled by Celery at once (acks_late + reject_on_worker_lost
requeue the message). A whole worker that vanishes (a GPU host gone) leaves its messages
unacknowledged until the broker's visibility timeout, which must outlast the longest page and so
cannot be the recovery mechanism: instead every beat also lets one live worker return the pages of
dead ones (`registry.reap`) and fail jobs past GNOSIS_JOB_MAX_AGE.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis

from ..job import now_rfc3339
from . import registry
from .runtime import Runtime

log = logging.getLogger(__name__)

INPUT_SWEEP_INTERVAL = 300
"""Seconds between sweeps of the input directory for files whose job has ended (GNOSIS_INPUT_STORE)."""


class Heartbeat:
    def __init__(self, rt: Runtime, app, *, concurrency: int) -> None:
        self.rt = rt
        self.redis = rt.redis
        self.app = app
        self.interval = rt.settings.heartbeat_interval
        self.worker = registry.worker_id()
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "engine": rt.settings.engine,
                     "concurrency": concurrency, "started_at": now_rfc3339()}
        self._stop = threading.Event()
        self._swept = 0.0

    def start(self) -> None:
        # Pool processes may have loaded their engines before this runs: keep what they recorded.
        threading.Thread(target=self._run, name="gnosis-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        try:
            registry.unregister(self.redis, self.worker)
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
                self.housekeeping()
            except redis.RedisError as exc:
                log.warning("heartbeat failed (Redis unreachable?): %s", exc)
            except Exception:
                # A silent heartbeat makes the other workers requeue this one's pages: never let it die.
                log.exception("heartbeat error")
            self._stop.wait(self.interval)

    def beat(self) -> None:
        dead = self.rt.engine_dead
        record = {**self.info, "engines_loaded": 0 if dead else self._live_engines()}
        if dead is not None:
            record["engine_dead"] = str(dead)
        registry.register(self.redis, self.worker, record, ttl=3 * self.interval)

    def housekeeping(self) -> None:
        if not registry.housekeeper(self.redis, self.interval):
            return
        requeued = registry.reap(self.redis, self.app, queue=self.rt.settings.queue)
        if requeued:
            self.rt.metrics.inc("gnosis_worker_recoveries_total", requeued)
        from .page import count_final

        for job_id in self.rt.jobs.expire_overdue(self.rt.settings.job_max_age):
            log.error("job %s did not finish within GNOSIS_JOB_MAX_AGE; failed with expired", job_id)
            count_final(self.rt, job_id)
        if time.monotonic() - self._swept > INPUT_SWEEP_INTERVAL:
            self._swept = time.monotonic()
            self.rt.jobs.inputs.sweep(lambda job_id: self.rt.jobs.field(job_id, "status") in ("queued", "running"))

    def _live_engines(self) -> int:
        """Pool processes with a loaded engine; entries of replaced (crashed) processes are dropped."""
        key = registry.engines_key(self.worker)
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
