"""Per-process worker state: settings, Redis, the job store and the one loaded engine."""

from __future__ import annotations

import logging
import os
import threading
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..errors import GnosisError
from ..job import JobStore
from ..metrics import Metrics
from ..settings import Settings
from .engines import Engine, load_engine

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # A page that finishes while Redis restarts must still be recorded: retry for about a minute
        # rather than fail the page (its message would come back only after the visibility timeout).
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            socket_timeout=max(settings.redis_timeout, 30),
            socket_connect_timeout=settings.redis_timeout,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=35),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self.jobs = JobStore(self.redis, ttl=settings.job_ttl, max_attempts=settings.page_max_attempts)
        self.metrics = Metrics(self.redis, background=True)
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def engine(self) -> Engine:
        """The engine, loaded on first use; a failed load is retried by the next page."""
        with self._lock:
            if self._engine is None:
                started = time.monotonic()
                self._engine = load_engine(self.settings, redis_client=self.redis, metrics=self.metrics)
                seconds = time.monotonic() - started
                self.metrics.observe("gnosis_model_load_seconds", seconds, engine=self.settings.engine)
                from .probe import local_metrics

                local_metrics()["model_load"].set(seconds)
                log.info("engine %s ready in %.2fs (pid %d)", self.settings.engine, seconds, os.getpid())
            return self._engine

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None

    def preload(self) -> None:
        from .heartbeat import engine_loaded

        try:
            self.engine()
            engine_loaded(self.redis)
        except GnosisError as exc:
            log.error("engine not loaded yet (%s): %s", exc.code, exc.message)
        except Exception:
            log.exception("engine failed to load; pages will retry the load")

    def warm_cache(self) -> str:
        from ..cache.store import ModelCache

        path = ModelCache(self.settings, self.redis, self.metrics).ensure_ready()
        return str(path)


_runtime: Runtime | None = None
_runtime_pid: int | None = None


def get() -> Runtime:
    """This process's runtime; a forked child builds its own rather than share sockets."""
    global _runtime, _runtime_pid
    if _runtime is None or _runtime_pid != os.getpid():
        _runtime = Runtime(Settings.from_env())
        _runtime_pid = os.getpid()
    return _runtime
