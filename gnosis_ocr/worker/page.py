"""Pages of one job: claim them, render them, recognise them in one engine call, record each once.

A task usually carries one page; with GNOSIS_PAGES_PER_TASK it carries a run of pages, so a GPU
engine can batch them.
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
from ..job import Claim, JobStatus
from . import heartbeat, notify
from .probe import local_metrics
from .runtime import Runtime

log = logging.getLogger(__name__)

Claimed = tuple[int, tuple[str, str, str], Claim]  # page, in-flight entry, claim


def run_pages(rt: Runtime, job_id: str, first: int, count: int = 1) -> str:
    claimed: list[Claimed] = []
    verdict = "gone"
    for page in range(first, first + count):
        entry = heartbeat.inflight(job_id, page)
        claim = rt.jobs.start_page(job_id, page, inflight=entry)
        verdict = claim.verdict
        if verdict == "exhausted":
            log.error("job %s page %d exceeded %d attempts; job failed", job_id, page,
                      rt.settings.page_max_attempts)
            _count_final(rt, job_id)
        if verdict == "run":
            claimed.append((page, entry, claim))
        elif verdict != "done":
            break  # the job is over (cancelled, failed, deleted): claim nothing more
    if not claimed:
        return verdict
    started = time.monotonic()
    local = local_metrics()
    local["in_flight"].inc(len(claimed))
    outcome = "error"
    try:
        outcome = _run(rt, job_id, claimed, started)
        return outcome
    finally:
        local["in_flight"].dec(len(claimed))
        local["pages"].labels(outcome=outcome).inc(len(claimed))
        local["page_seconds"].observe((time.monotonic() - started) / len(claimed))


def _run(rt: Runtime, job_id: str, claimed: list[Claimed], started: float) -> str:
    pages = [page for page, _, _ in claimed]
    try:
        texts = _recognise(rt, claimed)
    except SoftTimeLimitExceeded:
        _release_memory()
        limit = rt.settings.page_soft_time_limit * len(pages)
        return _fail(rt, job_id, pages, "timeout", f"{_describe(pages)} took longer than {limit} seconds.")
    except GnosisError as exc:
        return _fail(rt, job_id, pages, exc.code, exc.message)
    except Exception:
        log.exception("engine failed on job %s pages %s", job_id, pages)
        _release_memory()
        return _fail(rt, job_id, pages, "engine_error", f"The OCR engine failed on {_describe(pages).lower()}.")
    if texts is None:
        _forget(rt, job_id, pages)
        return "gone"
    engine = rt.engine()
    per_page = (time.monotonic() - started) / len(pages)
    for (page, entry, _), text in zip(claimed, texts, strict=True):
        done, total = rt.jobs.finish_page(job_id, page, text, model_id=engine.model_id,
                                          model_revision=engine.model_revision, inflight=entry)
        rt.metrics.observe("gnosis_page_duration_seconds", per_page, engine=rt.settings.engine)
        rt.metrics.inc("gnosis_pages_processed_total", engine=rt.settings.engine)
        if done > 0 and done == total:
            _count_final(rt, job_id)
    return "done"


def _recognise(rt: Runtime, claimed: list[Claimed]) -> list[str] | None:
    first = claimed[0][2]
    if first.data is None or first.kind is None:
        return None  # cancelled, deleted or expired while queued
    images = [document.render_page(first.data, first.kind, page, max_side=rt.settings.page_max_side,
                                   max_pixels=rt.settings.max_pixels) for page, _, _ in claimed]
    return rt.engine().recognize(images)


def _describe(pages: list[int]) -> str:
    if len(pages) == 1:
        return f"Page {pages[0] + 1}"
    return f"Pages {pages[0] + 1}-{pages[-1] + 1}"


def _forget(rt: Runtime, job_id: str, pages: list[int]) -> None:
    for page in pages:
        heartbeat.page_finished(rt.redis, job_id, page)


def _fail(rt: Runtime, job_id: str, pages: list[int], code: str, message: str) -> str:
    _forget(rt, job_id, pages)
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


def hard_timeout(rt: Runtime, job_id: str, first: int, count: int = 1) -> None:
    """Called in the worker's main process after it killed a pool process stuck past the hard limit."""
    pages = list(range(first, first + count))
    limit = rt.settings.page_hard_time_limit * count
    _fail(rt, job_id, pages, "timeout",
          f"{_describe(pages)} exceeded the hard time limit of {limit} seconds; the process was replaced.")
