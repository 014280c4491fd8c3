"""One page of one job: claim it, render it, recognise it, record it exactly once."""

from __future__ import annotations

import gc
import logging
import sys
import time
from datetime import datetime

from billiard.exceptions import SoftTimeLimitExceeded

from .. import document
from ..errors import GnosisError
from ..job import Claim, JobStatus
from . import heartbeat, notify
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
        outcome = _run(rt, job_id, page, claim, entry, started)
        return outcome
    finally:
        local["in_flight"].dec()
        local["pages"].labels(outcome=outcome).inc()
        local["page_seconds"].observe(time.monotonic() - started)


def _run(rt: Runtime, job_id: str, page: int, claim: Claim, entry: tuple[str, str, str], started: float) -> str:
    try:
        text = _recognise(rt, page, claim)
    except SoftTimeLimitExceeded:
        _release_memory()
        return _fail(rt, job_id, page, "timeout",
                     f"Page {page + 1} took longer than {rt.settings.page_soft_time_limit} seconds.")
    except GnosisError as exc:
        return _fail(rt, job_id, page, exc.code, exc.message)
    except Exception:
        log.exception("engine failed on job %s page %d", job_id, page)
        _release_memory()
        return _fail(rt, job_id, page, "engine_error", f"The OCR engine failed on page {page + 1}.")
    if text is None:
        heartbeat.page_finished(rt.redis, job_id, page)
        return "gone"
    engine = rt.engine()
    done, total = rt.jobs.finish_page(job_id, page, text, model_id=engine.model_id,
                                      model_revision=engine.model_revision, inflight=entry)
    rt.metrics.observe("gnosis_page_duration_seconds", time.monotonic() - started, engine=rt.settings.engine)
    rt.metrics.inc("gnosis_pages_processed_total", engine=rt.settings.engine)
    if done > 0 and done == total:
        _count_final(rt, job_id)
    return "done"


def _recognise(rt: Runtime, page: int, claim: Claim) -> str | None:
    if claim.data is None or claim.kind is None:
        return None  # cancelled, deleted or expired while queued
    image = document.render_page(
        claim.data, claim.kind, page, max_side=rt.settings.page_max_side, max_pixels=rt.settings.max_pixels
    )
    return rt.engine().recognize([image])[0]


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
    _fail(rt, job_id, page, "timeout", f"Page {page + 1} exceeded the hard time limit of "
                                       f"{rt.settings.page_hard_time_limit} seconds; its process was replaced.")
