"""What `gnosis-ocr worker` runs, decided from the settings and its arguments before anything starts.

`make` is pure (tested without a worker); `run` carries a plan out. The plan stays readable for the
life of the process (`current`), where Celery's signal handlers ask whether this is a light worker.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

from ..settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlan:
    light: bool
    """Consumes only cache warm-ups and webhooks (the process a page worker starts beside itself)."""
    batched: bool
    """One process owns the GPUs and its threads feed each device's batch: the engine is loaded
    before consuming, and the threads pool is sized from its slots."""
    pool: str | None
    """Celery's pool; None: Celery's default (prefork)."""
    concurrency: int
    """Pool size; for a batched worker, pages held beyond the batch (GNOSIS_PREFETCH_PAGES)."""
    queues: tuple[str, ...]
    sidecar: bool
    """Start a light worker beside this one, so webhooks and warm-ups never wait behind pages."""
    check_cache: bool
    """Fail at once if the shared model cache cannot be written."""
    threads: int
    """CPU threads per engine (OCR_THREADS, set for the pool processes): the cores shared out."""
    loglevel: str


def make(settings: Settings, *, light: bool = False, pool: str | None = None, concurrency: int = 1,
         loglevel: str = "INFO", cores: int | None = None) -> WorkerPlan:
    from ..broker import cache_queue, events_queue

    light_queues = (cache_queue(settings), events_queue(settings))
    threads = settings.threads or max(1, (cores or os.cpu_count() or 1) // max(concurrency, 1))
    if light:
        return WorkerPlan(light=True, batched=False, pool="threads", concurrency=concurrency, queues=light_queues,
                          sidecar=False, check_cache=False, threads=threads, loglevel=loglevel)
    gpu = settings.engine == "nanonets"
    batched = gpu and pool in (None, "threads")
    return WorkerPlan(light=False, batched=batched, pool="threads" if batched else pool,
                      concurrency=settings.prefetch_pages if batched else concurrency, queues=(settings.queue,),
                      sidecar=True, check_cache=gpu, threads=threads, loglevel=loglevel)


_current: WorkerPlan | None = None


def current() -> WorkerPlan | None:
    """The plan this process runs; None in a worker started some other way (`celery -A … worker`)."""
    return _current


def run(plan: WorkerPlan, settings: Settings) -> int:
    """Start the worker the plan describes and serve until it stops; the process's exit code."""
    global _current
    _current = plan
    if plan.check_cache:
        settings.check_cache_writable()
    os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub or transformers
    os.environ.setdefault("OCR_THREADS", str(plan.threads))  # read again by every pool process's settings
    from . import registry

    # Made before the engine loads (it records itself under this id) and inherited by pool processes.
    name = registry.assign_worker_id("light-" if plan.light else "")
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Set before any fork, so every pool child writes its metrics where the probe reads them.
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gnosis-metrics-")
        _remove_at_exit(metrics_dir)
    concurrency = plan.concurrency
    if plan.batched:
        from . import runtime

        rt = runtime.get()
        rt.preload(retry=True)
        concurrency += rt.engine().slots
    elif plan.pool == "threads" and not plan.light:  # a CPU engine on threads: no pool process loads it
        from . import runtime

        runtime.get().preload()
    if plan.sidecar:
        from . import sidecar

        sidecar.start_light_worker(loglevel=plan.loglevel)
    wait_for_writes(settings)
    from .celery_app import app

    argv = ["worker", f"--concurrency={concurrency}", f"--queues={','.join(plan.queues)}", "--optimization=fair",
            f"--loglevel={plan.loglevel}", "--without-mingle", "--without-gossip", f"--hostname={name}",
            "--task-events"]
    if plan.pool:
        argv.append(f"--pool={plan.pool}")
    # Celery's worker_main drops the worker's exit code. A worker that Celery stopped for an "Unrecoverable
    # error" must not exit 0, or a supervisor that restarts only on failure leaves it down.
    exits: list[int] = []

    def _record_exit(sender=None, **_) -> None:
        exits.append(getattr(sender, "exitcode", 0) or 0)

    from celery import signals

    signals.worker_shutdown.connect(_record_exit, weak=False)
    app.worker_main(argv)
    from . import runtime

    return runtime.EXIT_ENGINE_DEAD if runtime.engine_died() else (exits[-1] if exits else 0)


def wait_for_writes(settings: Settings) -> None:
    """Return once Redis takes a write. Celery's Redis transport writes a mutex as it starts consuming and
    takes a refusal (out of memory under noeviction, a replica's READONLY, MISCONF) for an unrecoverable
    error: the worker would stop at once, and a supervisor would restart it into the same refusal, backing
    off further each time. Waiting here, it starts consuming as soon as Redis has room again. A Redis that
    does not answer at all is left to Celery's own reconnection."""
    from ..redisconn import connect

    client = connect(settings.redis_url, socket_timeout=settings.redis_timeout,
                     socket_connect_timeout=settings.redis_timeout)
    try:
        _probe_until_written(client)
    finally:
        client.close()


def _probe_until_written(client) -> None:
    import redis

    from .. import keys
    from . import refusals

    try:
        # A REDIS_URL that names a replica waits here too, as does one out of memory.
        refusals.until_written("consuming", client.set, keys.WRITE_PROBE, "1", px=1000, replica_waits=True)
    except redis.RedisError:
        return  # not pressure (an ACL without this key, say), or no answer: Celery says what it finds


def _remove_at_exit(path: str) -> None:
    """Remove `path` when this process exits (not when a forked pool child does): no directory is left
    behind per worker start."""
    import atexit
    import shutil

    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
