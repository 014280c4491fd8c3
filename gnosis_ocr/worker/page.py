"""One page of one job: claim it, render it, recognise it, record it once.

With a batched engine many of these run at once, one per worker thread, and meet in the engine's
batch; rendering and preprocessing happen here, on the thread, while the device decodes others.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from datetime import datetime

from billiard.exceptions import SoftTimeLimitExceeded

from .. import document
from ..errors import GnosisError
from ..job import JobStatus
from . import heartbeat, notify
from .engines import Cancelled, PageText
from .probe import local_metrics
from .runtime import Runtime

log = logging.getLogger(__name__)


def run_page(rt: Runtime, job_id: str, page: int) -> str:
    entry = heartbeat.inflight(job_id, page)
    claim = rt.jobs.start_page(job_id, page, inflight=entry)
    if claim.verdict == "exhausted":
        log.error("job %s page %d exceeded %d attempts; job failed", job_id, page, rt.settings.page_max_attempts)
        _count_final(rt, job_id)
    if claim.verdict != "run":
        return claim.verdict
    started = time.monotonic()
    local = local_metrics()
    local["in_flight"].inc()
    outcome = "error"
    try:
        if claim.data is None or claim.kind is None:  # cancelled, deleted or expired while queued
            heartbeat.page_finished(rt.redis, job_id, page)
            outcome = "gone"
            return outcome
        outcome = _run(rt, job_id, page, entry, claim.data, claim.kind, started)
        return outcome
    finally:
        local["in_flight"].dec()
        local["pages"].labels(outcome=outcome).inc()
        local["page_seconds"].observe(time.monotonic() - started)


def _run(rt: Runtime, job_id: str, page: int, entry: tuple[str, str, str], data: bytes, kind: str,
         started: float) -> str:
    limit = rt.settings.page_soft_time_limit
    try:
        image = document.render_page(data, kind, page, max_side=rt.settings.page_max_side,
                                     max_pixels=rt.settings.max_pixels)
        engine = rt.engine()
        result = engine.recognize(image, deadline=started + limit, cancelled=lambda: _job_over(rt, job_id))
    except Cancelled:
        heartbeat.page_finished(rt.redis, job_id, page)
        return "gone"
    except (SoftTimeLimitExceeded, TimeoutError) as exc:
        if isinstance(exc, SoftTimeLimitExceeded):  # raised inside the engine's own call: free what it held
            _release_memory()
        return _fail(rt, job_id, page, "timeout", f"Page {page + 1} took longer than {limit} seconds.")
    except GnosisError as exc:
        return _fail(rt, job_id, page, exc.code, exc.message)
    except Exception:
        log.exception("engine failed on job %s page %d", job_id, page)
        _release_memory()
        return _fail(rt, job_id, page, "engine_error", f"The OCR engine failed on page {page + 1}.")
    done, total = rt.jobs.finish_page(job_id, page, result.text, model_id=engine.model_id,
                                      model_revision=engine.model_revision, inflight=entry,
                                      truncated=result.truncated)
    _observe(rt, result, time.monotonic() - started)
    if done > 0 and done == total:
        _count_final(rt, job_id)
    return "done"


def _job_over(rt: Runtime, job_id: str) -> bool:
    """True once the job is cancelled, failed or deleted: its pages are then wasted work."""
    status = rt.jobs.field(job_id, "status")
    return status is None or JobStatus(status).final


def _observe(rt: Runtime, result: PageText, seconds: float) -> None:
    engine = rt.settings.engine
    rt.metrics.observe("gnosis_page_duration_seconds", seconds, engine=engine)
    rt.metrics.inc("gnosis_pages_processed_total", engine=engine)
    if result.tokens:
        rt.metrics.inc("gnosis_output_tokens_total", result.tokens, engine=engine)
    if result.truncated:
        rt.metrics.inc("gnosis_pages_truncated_total", reason=result.stop_reason or "unknown")
    if result.queue_seconds is not None:
        rt.metrics.observe("gnosis_page_queue_wait_seconds", result.queue_seconds, engine=engine)
    if result.first_token_seconds is not None:
        rt.metrics.observe("gnosis_page_first_token_seconds", result.first_token_seconds, engine=engine)


def _fail(rt: Runtime, job_id: str, page: int, code: str, message: str) -> str:
    heartbeat.page_finished(rt.redis, job_id, page)
    log.warning("job %s failed: %s: %s", job_id, code, message)
    if rt.jobs.fail(job_id, code, message) == JobStatus.FAILED.value:
        _count_final(rt, job_id)
    return "failed"


def _count_final(rt: Runtime, job_id: str) -> None:
    """Once per job, by whoever moved it to its final state: metrics, then the webhook."""
    job = rt.jobs.get(job_id)
    if job is None or not job.final:
        return
    notify.enqueue(rt, job_id, job.callback_url)
    labels = {"outcome": job.status.value, "code": job.error_code or ""}
    rt.metrics.inc("gnosis_jobs_finished_total", **labels)
    if job.finished_at:
        seconds = (_parse(job.finished_at) - _parse(job.created_at)).total_seconds()
        rt.metrics.observe("gnosis_job_duration_seconds", seconds, outcome=job.status.value)


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _release_memory() -> None:
    gc.collect()
    # Only if an engine already uses torch: importing it here would itself take seconds.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def hard_timeout(rt: Runtime, job_id: str, page: int) -> None:
    """Called in the worker's main process after it killed a pool process stuck past the hard limit."""
    _fail(rt, job_id, page, "timeout",
          f"Page {page + 1} exceeded the hard time limit of {rt.settings.page_hard_time_limit} seconds; "
          "the process was replaced.")
