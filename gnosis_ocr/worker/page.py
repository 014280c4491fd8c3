"""One page of one job: claim it, render it, recognise it, record it once.

With a batched engine many of these run at once, one per worker thread, and meet in the engine's
batch; rendering and preprocessing happen here, on the thread, while the device decodes others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import sys
import time
import uuid
from datetime import datetime

import redis
from billiard.exceptions import SoftTimeLimitExceeded

from .. import backoff, defaults, document
from ..errors import EngineDead, GnosisError, UnreadableDocument
from ..job import Claim, Ending, JobStatus, Verdict
from . import notify, registry, telemetry
from .breaker import Open
from .engines import Cancelled, PageText
from .runtime import Runtime

log = logging.getLogger(__name__)


class RequeuePage(Exception):
    """Redis failed while claiming or recording a page: the task returns its message to the queue."""


class StepAside(RequeuePage):
    """The page cannot run for now through no fault of its own or of Redis (its bucket fails): it goes
    behind every other page, so that pages handed back again and again never starve the rest. `since`:
    when its bucket first failed it (unix seconds), carried by the page's next message."""

    def __init__(self, message: str, *, since: float) -> None:
        super().__init__(message)
        self.since = since


class SourceUnavailable(Exception):
    """The bucket holding a batch's document failed for now (after the storage client's own retries)."""

    def __init__(self, message: str, *, bucket: str) -> None:
        super().__init__(message)
        self.bucket = bucket


def run_page(rt: Runtime, job_id: str, page: int, *, tag: str | None = None,
             aside_since: float | None = None) -> str:
    """Claim, run and record one page; the verdict as a string. Raises RequeuePage on Redis errors.
    `aside_since`: when the page's bucket first failed it, if it was handed back for that."""
    if rt.engine_dead is not None:  # this worker is on its way out: leave the page, attempts untouched
        raise RequeuePage(f"job {job_id} page {page}: the engine is dead ({rt.engine_dead})")
    entry = registry.entry(job_id, page, tag)
    token = uuid.uuid4().hex  # this execution: the job store's scripts, repeated with it, act once
    try:
        claim = _claim(rt, job_id, page, entry, token)
    except redis.RedisError as exc:
        raise RequeuePage(f"could not claim job {job_id} page {page}: {exc}") from exc
    except SourceUnavailable as exc:  # claimed, then the bucket failed for now: the page runs later
        now = time.time()
        since = now if aside_since is None else aside_since
        if now - since > rt.settings.job_ttl / 2:  # as long as a result waits for its destination
            return _fail(rt, job_id, page, "source_unreadable",
                         f"gs://{exc.bucket} failed every read of this document for {_duration(now - since)}, "
                         "longer than half of GNOSIS_JOB_TTL; submit the batch again once it answers.")
        _give_back(rt, job_id, page, entry, token)
        raise StepAside(str(exc), since=since) from exc
    except GnosisError as exc:  # claimed, and its bucket's document can no longer be read as counted
        return _fail(rt, job_id, page, exc.code, exc.message)
    if claim.verdict is Verdict.EXHAUSTED:
        log.error("job %s page %d exceeded %d attempts; job failed", job_id, page, rt.settings.page_max_attempts)
        _safely(count_final, rt, job_id)
    if claim.verdict is not Verdict.RUN:
        return claim.verdict.value
    started = time.monotonic()
    local = telemetry.get()
    local.in_flight.inc()
    outcome = "error"
    try:
        if claim.data is None or claim.kind is None:
            if _job_over(rt, job_id):  # cancelled or deleted while queued
                registry.clear(rt.redis, job_id, page)
                outcome = "gone"
                return outcome
            outcome = _fail(rt, job_id, page, "input_missing",
                            "The document was not found in the input store (GNOSIS_INPUT_STORE).")
            return outcome
        outcome = _run(rt, job_id, page, entry, claim, started, token)
        return outcome
    finally:
        local.in_flight.dec()
        local.pages.labels(outcome=outcome).inc()
        local.page_seconds.observe(time.monotonic() - started)


def _claim(rt: Runtime, job_id: str, page: int, entry: tuple[str, str, str], token: str) -> Claim:
    """Claim the page, with its document from this host's copy when there is one."""
    data = rt.local_copies.get(job_id)
    if data is not None:
        claim = rt.jobs.start_page(job_id, page, inflight=entry, want_input=False, token=token)
        return dataclasses.replace(claim, data=data) if claim.verdict is Verdict.RUN else claim
    with rt.local_copies.fetching(job_id):  # pages of one job claimed at once on this host fetch it once
        data = rt.local_copies.get(job_id)
        from_redis = data is None and rt.jobs.inputs.in_redis
        claim = rt.jobs.start_page(job_id, page, inflight=entry, want_input=from_redis, token=token)
        if claim.verdict is not Verdict.RUN:
            return claim
        if data is None:
            if claim.options.source:  # a batch's document: read from its bucket by this worker
                data = _read_bucket(rt, job_id, claim.options.source)
            else:
                data = claim.data if from_redis else _read_store(rt, job_id)
            if data is not None:
                rt.local_copies.put(job_id, data)
        return dataclasses.replace(claim, data=data)


def _engine_died(rt: Runtime, job_id: str, page: int, entry: tuple[str, str, str], token: str, deaths: int,
                 exc: EngineDead) -> str:
    """The engine died with the page in it. A page that ran alone on its device (`admission.py`) is what
    stops it, and fails; any other goes back to the queue with its attempt returned, and, if it was on the
    device, one more death counted, so it comes back as a suspect."""
    if exc.on_device and deaths >= defaults.ENGINE_DEATHS_ALONE:
        return _fail(rt, job_id, page, "engine_error",
                     f"Page {page + 1} stopped the OCR engine {deaths + 1} times, the last time alone on its device; "
                     "the job was stopped so that it stops no more.")
    if exc.on_device:
        log.warning("job %s page %d was on the device when its engine died (%d time(s) now): it goes back to the "
                    "queue as a suspect", job_id, page, deaths + 1)
    _give_back(rt, job_id, page, entry, token, death=exc.on_device)
    raise RequeuePage(f"job {job_id} page {page}: {exc.message}") from exc


def _give_back(rt: Runtime, job_id: str, page: int, entry: tuple[str, str, str], token: str, *,
               death: bool = False) -> None:
    """The page never ran, through no fault of its own (or none known): its attempt is returned with its
    claim, so an outage of the bucket, however long, is waited out (GNOSIS_JOB_MAX_AGE bounds it), never
    counted as a worker that keeps dying on the page. `death`: count an engine death instead."""
    try:
        rt.jobs.release_page(job_id, page, inflight=entry, token=token, death=death)
    except redis.RedisError as exc:  # the attempt stays counted; the stale in-flight entry is harmless
        log.warning("job %s page %d: could not give its attempt back: %s", job_id, page, exc)


def _read_bucket(rt: Runtime, job_id: str, uri: str) -> bytes:
    """The generation of the object that the batch counted; GnosisError if it can no longer be read
    (the job fails), SourceUnavailable while the bucket fails for now (the page goes back): at once,
    without a call, while another thread of this process probes it (worker/breaker.py)."""
    from google.api_core.exceptions import NotFound

    from .. import gcs
    from . import batches

    bucket = uri[len("gs://"):].partition("/")[0]
    try:
        with rt.source_reads.call(bucket, hold=2 * rt.settings.bucket_timeout):
            return gcs.read(uri, max_bytes=rt.settings.max_upload_bytes)
    except Open:
        raise SourceUnavailable(f"job {job_id}: gs://{bucket} failed a read for now and another page is "
                                "trying it", bucket=bucket) from None
    except GnosisError:
        raise  # larger than an upload may be, since it was counted
    except Exception as exc:
        if gcs.transient(exc):
            batches.bucket_failed(rt, "read")
            raise SourceUnavailable(f"job {job_id}: could not read {uri} for now: {exc}", bucket=bucket) from exc
        log.error("job %s: could not read %s: %s", job_id, uri, exc)
        name = uri.partition("#")[0]
        if isinstance(exc, NotFound):
            raise UnreadableDocument(f"{name} was replaced or deleted after the batch counted its pages; submit "
                                     "the batch again to read it as it is now.", code="input_missing") from None
        raise UnreadableDocument(f"{name} could not be read: {exc}", code="source_unreadable") from None


def _read_store(rt: Runtime, job_id: str) -> bytes | None:
    """The input from the shared directory; written on another host, it may take the mount's metadata
    cache a while to show it."""
    return backoff.poll(lambda: rt.jobs.fetch_input(job_id), timeout=rt.settings.cache_visibility_wait, first=0.05,
                        cap=2.0, stop=lambda: _job_over(rt, job_id))


def _run(rt: Runtime, job_id: str, page: int, entry: tuple[str, str, str], claim: Claim, started: float,
         token: str) -> str:
    limit = rt.settings.page_soft_timeout
    data, kind, options = claim.data, claim.kind, claim.options
    source = options.document_page(page)  # the job's page `page` is this page of the document
    try:
        engine = rt.engine()
        renderer = rt.pdf_renderer() if kind == "pdf" else None
        # GNOSIS_PAGE_MAX_SIDE is the VLM's token budget; an engine that reads scans wants its own dpi.
        how = {"dpi": engine.render_dpi, "grayscale": engine.render_grayscale}
        if renderer is not None:  # a threads pool: no Celery time limit, so the render has its own
            image = renderer.render(data, source, max_side=rt.settings.page_max_side,
                                    max_pixels=rt.settings.max_pixels, deadline=started + limit, **how)
        else:
            image = document.render_page(data, kind, source, max_side=rt.settings.page_max_side,
                                         max_pixels=rt.settings.max_pixels, **how)
        extra = {"language": options.language} if options.language else {}
        if claim.deaths:
            extra["deaths"] = claim.deaths
        with contextlib.nullcontext() if engine.batched else rt.serial, rt.watch.watching(job_id):
            result = engine.recognize(image, deadline=started + limit, cancelled=lambda: rt.watch.over(job_id),
                                      **extra)
    except Cancelled:
        registry.clear(rt.redis, job_id, page)
        rt.local_copies.drop(job_id)
        return "gone"
    except EngineDead as exc:
        return _engine_died(rt, job_id, page, entry, token, claim.deaths, exc)
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
    # The text is in hand: recording it is worth retrying through a Redis restart, a failover or an
    # out-of-memory reply, rather than running the page again.
    record = _retrying(rt, f"record job {job_id} page {page}", lambda: rt.jobs.finish_page(
        job_id, page, result.text, model_id=engine.model_id, model_revision=engine.model_revision, inflight=entry,
        truncated=result.truncated, token=token))
    _observe(rt, result, time.monotonic() - started)
    if record.completed_job:
        rt.local_copies.drop(job_id)
        _safely(count_final, rt, job_id)
    return "done"


def _retrying(rt: Runtime, what: str, call):
    """`call()`, retried with back-off through Redis errors for GNOSIS_REDIS_RETRY seconds."""
    deadline = time.monotonic() + rt.settings.redis_retry
    for delay in backoff.delays(0.25, 5.0):
        try:
            return call()
        except redis.RedisError as exc:
            if time.monotonic() + delay > deadline:
                raise RequeuePage(f"could not {what}: {exc}") from exc
            log.warning("could not %s (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)  # back-off between retries of a failed Redis call


def _safely(fn, *args) -> None:
    """Metrics and webhooks after a job ended: a Redis error here must not undo the page."""
    try:
        fn(*args)
    except Exception as exc:  # Redis or the broker unreachable: a missed count, never a lost page
        log.warning("could not count or announce finished job %s: %s", args[-1], exc)


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
        reason = result.stop_reason.value if result.stop_reason else "unknown"
        rt.metrics.inc("gnosis_pages_truncated_total", reason=reason)
    if result.timings is not None:
        rt.metrics.observe("gnosis_page_queue_wait_seconds", result.timings.queue_seconds, engine=engine)
        rt.metrics.observe("gnosis_page_first_token_seconds", result.timings.first_token_seconds, engine=engine)


def _fail(rt: Runtime, job_id: str, page: int, code: str, message: str) -> str:
    log.warning("job %s failed: %s: %s", job_id, code, message)
    verdict = _retrying(rt, f"fail job {job_id}", lambda: rt.jobs.fail(job_id, code, message))
    registry.clear(rt.redis, job_id, page)
    rt.local_copies.drop(job_id)
    if verdict is Ending.ENDED:
        _safely(count_final, rt, job_id)
    return "failed"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def count_final(rt: Runtime, job_id: str) -> None:
    """Once per job, by whoever moved it to its final state: metrics, then the webhook."""
    job = rt.jobs.get(job_id)
    if job is None or not job.final:
        return
    notify.enqueue(rt, job_id, job.callback_url)
    from . import batches

    batches.document_ended(rt, job)
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


def crashed(rt: Runtime, job_id: str, page: int, exc: BaseException) -> None:
    """Called when running the page raised what nothing here expects: the job fails now, its reason in
    the log, rather than staying "running" with no message left to run it."""
    try:
        if isinstance(exc, SoftTimeLimitExceeded):  # while its document was still being fetched
            _fail(rt, job_id, page, "timeout",
                  f"Page {page + 1} took longer than {rt.settings.page_soft_timeout} seconds.")
            return
        log.error("job %s page %d: unexpected error", job_id, page, exc_info=exc)
        _fail(rt, job_id, page, "internal_error", f"Page {page + 1} could not be processed because of an "
              "internal error; it is in the worker's log.")
    except Exception as error:  # Redis failing too: the max-age sweep ends the job
        log.error("could not fail job %s: %s", job_id, error)


def hard_timeout(rt: Runtime, job_id: str, page: int) -> None:
    """Called in the worker's main process after it killed a pool process stuck past the hard limit."""
    try:
        _fail(rt, job_id, page, "timeout",
              f"Page {page + 1} exceeded the hard time limit of {rt.settings.page_hard_timeout} seconds; "
              "the process was replaced.")
    except RequeuePage as exc:  # the message is already acknowledged: the max-age sweep ends the job
        log.error("%s", exc)
