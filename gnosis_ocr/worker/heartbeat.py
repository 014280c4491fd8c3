"""The worker's beat: says it is alive and ready, and runs the cluster's housekeeping.

A pool process killed mid-page is handled by Celery at once (acks_late + reject_on_worker_lost
requeue the message). A whole worker that vanishes (a GPU host gone) leaves its messages
unacknowledged until the broker's visibility timeout, which must outlast the longest page and so
cannot be the recovery mechanism: instead every beat also lets one live worker return the pages of
dead ones (`registry.reap`) and fail jobs past GNOSIS_JOB_MAX_AGE. Every beat also drops this
worker's in-flight entries that no delivery it holds wrote (`registry.prune`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque

import redis

from .. import keys, replication
from ..broker import cache_queue, events_queue
from ..job import now_rfc3339
from . import loopwatch, outbox, plan, registry
from .listings import Listings
from .reconcile import Reconciler
from .runtime import Runtime

log = logging.getLogger(__name__)

RECONCILE_EVERY = 6
"""Heartbeat intervals between two passes of the lost-page reconciler (30 s by default)."""

INPUT_SWEEP_INTERVAL = 300
"""Seconds between sweeps of the input directory for files whose job has ended (GNOSIS_INPUT_STORE)."""

NODES_REMEMBERED = 4
"""Replication ids a worker remembers of the Redis nodes it beat to: a new one counts as a gap in the beats."""


class Heartbeat:
    def __init__(self, rt: Runtime, app, *, concurrency: int) -> None:
        self.rt = rt
        self.redis = rt.redis
        self.app = app
        self.interval = rt.settings.heartbeat_interval
        self.ttl = 3 * self.interval  # a worker record's lifetime: three missed beats
        self.worker = registry.worker_id()
        current = plan.current()
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "engine": rt.settings.engine,
                     "role": "light" if current is not None and current.light else "pages",
                     "concurrency": concurrency, "started_at": now_rfc3339()}
        if rt.settings.engine == "tesseract":  # the API checks a job's `language` against these
            from .engines.tesseract import installed_languages

            self.info["languages"] = installed_languages()
        self._stop = threading.Event()
        self._swept = 0.0
        self._reconciled = 0.0
        self.reconciler = Reconciler(rt.redis, app, queue=rt.settings.queue, grace=rt.settings.reconcile_grace)
        self.listings = Listings(rt.redis, app, queue=cache_queue(rt.settings), grace=rt.settings.reconcile_grace)
        self._engine_pids: set[str] = set()  # every process seen with a loaded engine, kept across Redis gaps
        self._beating_since: float | None = None  # first good beat since Redis last failed us
        self._last_beat = 0.0
        # Replication ids of the Redis nodes beaten to lately: a new one is a failover or a restart, and a
        # proxy that answers INFO from either of two nodes in turn is not one at every beat.
        self._nodes: deque[str] = deque(maxlen=NODES_REMEMBERED)
        self._state = threading.Lock()  # `_nodes`, `_beating_since` and `_last_beat`, read together

    def start(self) -> None:
        # Pool processes may have loaded their engines before this runs: keep what they recorded.
        threading.Thread(target=self._run, name="gnosis-heartbeat", daemon=True).start()
        # Housekeeping has a thread of its own: a slow pass (a long queue, a slow FUSE listing) must never
        # delay the beat, or this worker would be reaped for it.
        threading.Thread(target=self._housekeep, name="gnosis-housekeeping", daemon=True).start()

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
                self._beaten(replication.node_id(self.redis))
                self._check_loop()
                self._prune()
            except redis.RedisError as exc:
                with self._state:
                    self._beating_since = None
                log.warning("heartbeat failed (Redis unreachable?): %s", exc)
            except Exception:
                # A silent heartbeat makes the other workers requeue this one's pages: never let it die.
                log.exception("heartbeat error")
            self._stop.wait(self.interval)

    def _beaten(self, node: str | None) -> None:
        """A beat reached `node`. One that came late (its Redis calls retried through an outage) is a gap in
        the beats, and so is a beat to a node not beaten to lately: a promoted replica that lagged has let
        records expire that the primary still held, though their workers beat all along. Under the lock: the
        housekeeper never sees the new node without the gap it makes (`_steady`)."""
        with self._state:
            now = time.monotonic()
            moved = self._moved(node)
            if self._beating_since is None or now - self._last_beat > self.ttl or moved:
                self._beating_since = now
            self._last_beat = now

    def _steady(self, node: str | None) -> bool:
        """Whether dead workers can be told from the living on `node` (read before this call): every worker
        has beaten there for a full record lifetime since the last gap. After a gap in which nobody could beat
        (Redis away or restarting), or on a node not beaten to lately, every record may have expired. A node
        that refuses INFO (None) is told by gaps in the beats alone."""
        with self._state:
            now = time.monotonic()
            return (self._beating_since is not None and now - self._last_beat < self.ttl
                    and now - self._beating_since > self.ttl + self.interval
                    and (node is None or node in self._nodes))

    def _moved(self, node: str | None) -> bool:
        """Whether `node`, the Redis beaten to, is one not beaten to before (a failover, a restart)."""
        if node is None or node in self._nodes:
            return False
        moved = bool(self._nodes)
        self._nodes.append(node)
        if moved:
            log.warning("Redis is another node now (its replication id changed: a failover or a restart); pages "
                        "of workers that stopped beating are returned only once every worker has had %.0fs to "
                        "beat there", self.ttl + self.interval)
        return moved

    def _prune(self) -> None:
        """This worker's in-flight entries kept true (`registry.prune`); a failure here is not a failed beat."""
        try:
            dropped = registry.prune(self.redis, registry.held_tags)
        except Exception as exc:  # Redis away: the next beat tries again
            log.warning("could not check this worker's in-flight entries: %s", exc)
            return
        if dropped:
            log.warning("dropped %d in-flight entr%s of deliveries this worker no longer holds (their ending was "
                        "lost, by a failover say): %s", len(dropped), "y" if len(dropped) == 1 else "ies",
                        ", ".join(dropped[:10]))

    def _check_loop(self) -> None:
        limit = self.rt.settings.loop_stall_timeout
        if not limit or self._stop.is_set() or loopwatch.stopping():
            return
        stalled = loopwatch.stalled_for(answering_since=self._beating_since)
        if stalled > limit:
            loopwatch.stop_stalled(stalled, lambda: registry.unregister(self.redis, self.worker))

    def _housekeep(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.housekeeping()
            except redis.RedisError as exc:
                log.warning("housekeeping failed (Redis unreachable?): %s", exc)
            except Exception:
                log.exception("housekeeping error")

    def beat(self) -> None:
        dead = self.rt.engine_dead
        record = {**self.info, "engines_loaded": 0 if dead else self._live_engines()}
        devices = self.rt.devices()
        if devices:  # `gnosis-ocr workers` shows them
            record["devices"] = devices
        if dead is not None:
            record["engine_dead"] = str(dead)
        registry.register(self.redis, self.worker, record, ttl=self.ttl)

    def housekeeping(self) -> None:
        """One pass of the cluster's duties, by the one worker that holds the housekeeper's lease. Each duty
        runs apart: one that fails (a record it cannot read, a bug) is logged and counted
        (`gnosis_housekeeping_failures_total`, alert GnosisHousekeepingFailing) and the others still run. A
        failing reconciler once skipped every duty after it, webhooks and batches included, at every pass.
        Redis failing stops the pass: every duty would fail the same way."""
        if not registry.housekeeper(self.redis, self.interval):
            return
        self._duty("reap", self._reap)
        self._duty("expire", self._expire)
        if time.monotonic() - self._reconciled > RECONCILE_EVERY * self.interval:
            self._reconciled = time.monotonic()
            self._duty("reconcile", self._reconcile)
            self._duty("batches", self._recover_batches)
            self._duty("webhooks", self._republish_webhooks)
            self._duty("inputs", lambda: self.rt.jobs.delete_ended_inputs(self.rt.settings.reconcile_grace))
        if time.monotonic() - self._swept > INPUT_SWEEP_INTERVAL:
            self._swept = time.monotonic()
            self._duty("sweep", lambda: self.rt.jobs.inputs.sweep(
                lambda job_id: self.rt.jobs.field(job_id, "status") in ("queued", "running")))

    def _duty(self, name: str, run) -> None:
        try:
            run()
        except redis.RedisError:
            raise
        except Exception:
            log.exception("housekeeping: %s failed; the other duties go on", name)
            self.rt.metrics.inc("gnosis_housekeeping_failures_total", duty=name)

    def _reap(self) -> None:
        # This thread may get here before the beat thread notices a gap: a beat long overdue is one, and so is
        # a node not beaten to lately. The node is read first, then the beats' state as one reading: read
        # apart, a beat to a new node could come between them and the old node's state pass for the new one's.
        if self._steady(replication.node_id(self.redis)):
            requeued = registry.reap(self.redis, self.app, queue=self.rt.settings.queue)
            if requeued:
                self.rt.metrics.inc("gnosis_worker_recoveries_total", requeued)

    def _expire(self) -> None:
        from .page import count_final

        for job_id in self.rt.jobs.expire_overdue(self.rt.settings.job_max_age):
            log.error("job %s did not finish within GNOSIS_JOB_MAX_AGE; failed with expired", job_id)
            count_final(self.rt, job_id)

    def _reconcile(self) -> None:
        published = self.reconciler.run()
        if published:
            self.rt.metrics.inc("gnosis_pages_republished_total", published)

    def _recover_batches(self) -> None:
        from . import batches

        batches.recover(self.rt, grace=self.rt.settings.reconcile_grace)
        relisted = self.listings.run()
        if relisted:
            self.rt.metrics.inc("gnosis_batch_listings_republished_total", relisted)

    def _republish_webhooks(self) -> None:
        owed = outbox.republish(self.redis, self.app, queue=events_queue(self.rt.settings),
                                grace=self.rt.settings.reconcile_grace)
        if owed:
            self.rt.metrics.inc("gnosis_webhooks_republished_total", owed)

    def _live_engines(self) -> int:
        """Processes with a loaded engine. Those seen once are written back every beat, so a hash lost
        with Redis (a restart without persistence, a reaper that ran across a gap) comes back at once;
        entries of replaced (crashed) processes are dropped."""
        key = keys.worker_engines(self.worker)
        seen = {raw.decode() for raw in self.redis.hkeys(key)} | self._engine_pids
        if self.rt.engine_loaded:  # a batched engine lives in this process
            seen.add(str(os.getpid()))
        live = {pid for pid in seen if _alive(pid)}
        if seen - live:
            self.redis.hdel(key, *(seen - live))
        if live - self._engine_pids or len(live) != len(seen):
            log.debug("engines alive in %s: %s", self.worker, sorted(live))
        if live:
            self.redis.hset(key, mapping={pid: now_rfc3339() for pid in live})
        self._engine_pids = live
        return len(live)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True
