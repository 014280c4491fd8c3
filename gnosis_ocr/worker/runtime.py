"""Per-process worker state: settings, Redis, the job store and the one loaded engine."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .. import backoff, gcs, inputstore
from ..defaults import CANCEL_CHECK_INTERVAL, ENGINE_EXIT_GRACE, PDF_RENDERERS
from ..errors import EngineCheckFailed, GnosisError
from ..job import JobStore
from ..metrics import Metrics
from ..redisconn import connect
from ..settings import Settings
from . import plan, telemetry
from .breaker import Breaker
from .engines import Engine, load_engine
from .local_copies import LocalCopies
from .render import PdfRenderer
from .watch import JobWatch

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        gcs.configure(timeout=settings.bucket_timeout)
        # A page that finishes while Redis restarts must still be recorded: retry for about a minute
        # rather than fail the page (its message would come back only after the visibility timeout).
        self.redis = connect(
            settings.redis_url,
            socket_timeout=max(settings.redis_timeout, 30),
            socket_connect_timeout=settings.redis_timeout,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=35),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            # A batched worker runs a page per thread (up to 64 slots and the prefetched pages), each
            # with its own calls; redis-py's default pool stops at 100.
            max_connections=1000,
        )
        self.jobs = JobStore(self.redis, ttl=settings.job_ttl, max_attempts=settings.page_max_attempts,
                             inputs=inputstore.from_setting(settings.input_store, self.redis))
        self.local_copies = LocalCopies(settings.input_cache_dir or None, max_bytes=settings.input_cache_bytes)
        self.metrics = Metrics(self.redis, background=True)
        self.watch = JobWatch(self.jobs.statuses, interval=CANCEL_CHECK_INTERVAL)
        """Whether the jobs of the pages in the engine are still wanted, for all of them at once."""
        # Buckets failing for now: a page's source is probed by one thread at a time; a result's
        # destination no sooner than the housekeeper's next pass, which writes what was left owed.
        self.source_reads = Breaker(gcs.transient)
        self.result_writes = Breaker(gcs.transient, rest=settings.reconcile_grace)
        self._engine: Engine | None = None
        self._renderer: PdfRenderer | None = None
        self._lock = threading.Lock()
        self.serial = threading.Lock()
        """Held around an engine that is not batched while it recognises a page: on a threads pool its
        threads share it, and Tesseract's and onnxruntime's sessions are not safe to call at once."""
        self.engine_dead: BaseException | None = None
        self.on_engine_dead = None  # how the process stops when its engine dies; tests replace it

    def engine(self) -> Engine:
        """The engine, loaded on first use; a failed load is retried by the next page."""
        with self._lock:
            if self._engine is None:
                started = time.monotonic()
                self._engine = load_engine(self.settings, redis_client=self.redis, metrics=self.metrics,
                                           on_work=_record_work, on_dead=self._engine_died)
                seconds = time.monotonic() - started
                self.metrics.observe("gnosis_model_load_seconds", seconds, engine=self.settings.engine)
                telemetry.get().model_load.set(seconds)
                for device, info in self.devices().items():
                    paths = {k: v for k, v in info.items() if k != "slots"}
                    telemetry.get().batch_slots.labels(device=device).set(info["slots"])
                    if paths:
                        telemetry.get().device_info.labels(device=device, **paths).set(1)
                log.info("engine %s ready in %.2fs (pid %d)", self.settings.engine, seconds, os.getpid())
            return self._engine

    def pdf_renderer(self) -> PdfRenderer | None:
        """Renderer processes for PDF pages where a page has no time limit of its own (a batched engine
        on a threads pool); None where Celery's limits already bound a render (prefork)."""
        if self._engine is None or not self._engine.batched:
            return None
        with self._lock:
            if self._renderer is None:
                self._renderer = PdfRenderer(PDF_RENDERERS)
            return self._renderer

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None and self.engine_dead is None

    def devices(self) -> dict[str, dict]:
        """A batched engine's devices once loaded in this process: slots, and the paths its checks kept."""
        engine = self._engine
        if engine is None or not engine.batched:
            return {}
        paths = getattr(engine, "attention_paths", {})
        return {device: {"slots": slots, **paths.get(device, {})} for device, slots in engine.devices.items()}

    def _engine_died(self, error: BaseException) -> None:
        """The engine cannot serve any more (its loop died or its device is gone). Its pages are already
        resolved with EngineDead and go back to the queue from their threads; readiness turns 503 now;
        then the worker stops (a warm shutdown: consuming ends, page threads finish requeueing) and
        exits with EXIT_ENGINE_DEAD so that its supervisor starts a fresh process on a fresh context."""
        if self.engine_dead is not None:
            return
        self.engine_dead = error
        log.critical("the engine is dead (%s); returning pages to the queue and restarting the worker", error)
        self.metrics.inc("gnosis_engine_deaths_total")
        (self.on_engine_dead or _stop_this_process)(error)

    def expected_engines(self, pool_limit: int) -> int:
        """Engines this worker loads before it is ready: none for the light (webhook, cache) worker, one
        for a threads or solo pool (its threads share one engine: a batched one, or any other serially),
        else one per pool process."""
        current = plan.current()
        if current is not None and current.light:
            return 0
        if (self._engine is not None and self._engine.batched) or (current is not None and
                                                                   current.pool in ("threads", "solo")):
            return 1
        return pool_limit

    def preload(self, *, retry: bool = False) -> None:
        """Load the engine now. With `retry`, keep trying with back-off (a batched worker has nothing to
        do without it); otherwise a failed load is retried by the next page."""
        for delay in backoff.delays(2.0, 60.0):
            self._preload_once()
            if self._engine is not None or not retry:
                return
            log.warning("retrying the engine load in %.0fs", delay)
            time.sleep(delay)  # back-off between load attempts, not a synchronisation

    def _preload_once(self) -> None:
        from .registry import engine_loaded

        try:
            self.engine()
            engine_loaded(self.redis)
        except EngineCheckFailed:  # wrong text would follow: no retry, the worker refuses to start
            raise
        except GnosisError as exc:
            log.error("engine not loaded yet (%s): %s", exc.code, exc.message)
        except Exception:
            log.exception("engine failed to load; pages will retry the load")

    def warm_cache(self) -> str:
        from ..cache.store import ModelCache

        path = ModelCache(self.settings, self.redis, self.metrics).ensure_ready()
        return str(path)


EXIT_ENGINE_DEAD = 70
"""The worker's exit status after its engine died (EX_SOFTWARE): its supervisor starts a fresh one."""


def _stop_this_process(error: BaseException) -> None:
    """A warm shutdown now (Celery stops consuming and lets the page threads requeue their pages; the
    channel returns what is still unacknowledged), and an exit regardless once the grace is over."""
    timer = threading.Timer(ENGINE_EXIT_GRACE, os._exit, args=(EXIT_ENGINE_DEAD,))
    timer.daemon = True
    timer.start()
    os.kill(os.getpid(), signal.SIGTERM)


def _record_work(device: str, phase: str, pages: int, seconds: float) -> None:
    local = telemetry.get()
    if phase == "prefill":
        local.prefills.labels(device=device).inc()
        local.prefill_pages.labels(device=device).inc(pages)
        local.prefill_seconds.labels(device=device).inc(seconds)
        return
    local.batch_active.labels(device=device).set(pages)
    local.decode_steps.labels(device=device).inc()
    local.decode_tokens.labels(device=device).inc(pages)
    local.decode_seconds.labels(device=device).inc(seconds)


_runtime: Runtime | None = None
_runtime_pid: int | None = None


def engine_died() -> bool:
    """Whether this process's engine died (without building a runtime where there is none)."""
    return _runtime is not None and _runtime_pid == os.getpid() and _runtime.engine_dead is not None


def get() -> Runtime:
    """This process's runtime; a forked child builds its own rather than share sockets."""
    global _runtime, _runtime_pid
    if _runtime is None or _runtime_pid != os.getpid():
        _runtime = Runtime(Settings.from_env())
        _runtime_pid = os.getpid()
    return _runtime
