"""/v1/jobs: submit, poll (with long-poll), fetch results, cancel, delete."""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata

from flask import Blueprint, Response, jsonify, request

from .. import document, keys, options, webhook
from ..broker import DELIVER_WEBHOOK_TASK, OCR_PAGE_TASK, events_queue, page_priority
from ..defaults import DEFAULT_WAIT_MAX
from ..errors import BadRequest, Conflict, NotFound, QueueFull, Unavailable
from ..job import ClaimLost, Ending, Job, JobStatus, new_job_id
from ..result import result_object, result_text
from . import ctx, idempotency
from .auth import current_owner, require_key

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
bp.before_request(require_key)

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@bp.post("")
def submit():
    c = ctx()
    upload = request.files.get("file")
    if upload is None:
        raise BadRequest("Send the document as a multipart/form-data field named 'file'.", code="missing_file")
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        idempotency.validate(key)
    callback_url = _callback_url()
    wanted_pages = request.form.get("pages")
    chosen = options.parse_pages(wanted_pages) if wanted_pages is not None else None
    language = request.form.get("language")
    if language is not None:
        options.check_language(language, c.languages.get())
    data = upload.read()
    info = document.inspect(data, max_pages=c.settings.max_pages, max_pixels=c.settings.max_pixels)
    opts = options.Options(pages=wanted_pages, page_map=options.select(chosen, info.pages) if chosen else (),
                           language=language)
    pages = len(opts.page_map) or info.pages

    job_id = new_job_id()
    idem_name = claim = ""
    if key is not None:
        idem_name = keys.idempotency(current_owner(), key)
        sha = hashlib.sha256(data).hexdigest()
        claim = idempotency.claim_value(job_id, sha)
        answer = idempotency.take_key(c.redis, idem_name, new_id=job_id, fingerprint=sha, ttl=c.settings.job_ttl,
                                      replay=_replay)
        if answer is not None:
            return answer
    try:
        backlog = _check_queue_room(pages, len(data))
        # What the job costs Redis until it ends: its document (when kept there), its record and messages.
        # (Redis's allocator rounds large values up: about 15% over the document's bytes.)
        c.memory.note((len(data) * 115 // 100 if c.jobs.inputs.in_redis else 0) + 4096 * (1 + pages))
        job = c.jobs.create(data=data, kind=info.kind, pages=pages, owner=current_owner(),
                            filename=clean_filename(upload.filename), job_id=job_id,
                            extra={"idem_key": idem_name, "callback_url": callback_url,
                                   "options": opts.to_record()}, idem_claim=claim)
        try:
            publishing = time.monotonic()
            _enqueue(job, page_priority(backlog))
            c.enqueued(job.pages_total, since=publishing)
            c.confirm_accepted("job")
        except Exception:
            # An accepted job must be a queued job that outlives a failover: if its pages cannot be sent,
            # or replicas do not confirm it, it never existed (a worker given a page of it drops the page).
            # Unless a retry with its Idempotency-Key has answered with it meanwhile: then it stays, and
            # so does this answer (a page it never sent is published again by the workers' housekeeper).
            if c.jobs.abandon(job.id):
                raise
    except ClaimLost:
        # This request was slow enough that a retry took its key over and made the job: that job is
        # the answer, and nothing of this request was written.
        return _replay(idempotency.holder(c.redis, idem_name) or job_id) or idempotency.still_in_use()
    except Exception:
        if idem_name:
            idempotency.release(c.redis, idem_name, claim)  # also when the record was never written
        raise
    c.metrics.inc("gnosis_jobs_submitted_total")
    response = jsonify(job.to_api())
    response.status_code = 202
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return response


def _callback_url() -> str:
    url = request.form.get("callback_url")
    if url is None:
        return ""
    settings = ctx().settings
    if not settings.webhook_secret:
        raise BadRequest("Webhooks are not enabled on this server (GNOSIS_WEBHOOK_SECRET is unset).",
                         code="webhooks_disabled")
    return webhook.check_url(url, allow_private=settings.webhook_allow_private)


def _replay(job_id: str):
    """The answer for a retry: the first request's job (idempotency.replay), or None."""
    c = ctx()
    job = idempotency.replay(lambda: c.jobs.get(job_id), confirm=lambda: c.confirm_accepted("job"),
                             vouch=lambda: c.jobs.vouch(job_id))
    if job is None:
        return None
    response = jsonify(job.to_api())
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return response


def _check_queue_room(pages: int, size: int) -> int:
    """Refuse (429) a job the queue has no room for; returns its owner's pages to do, this job's included."""
    c = ctx()
    memory = c.memory.current()
    if memory.limit and memory.used > c.settings.redis_memory_limit * memory.limit:
        # Room kept for what accepted jobs still write (records, results, acks), so they always finish.
        raise Unavailable(f"Redis is {memory.fraction():.0%} full; new jobs wait until accepted ones finish. "
                          "Retry later.", code="redis_full")
    depth = c.queue_depth()  # messages in the queue: one per page
    if depth + pages > c.settings.max_queue_depth:
        raise QueueFull(f"The queue is full ({depth} pages waiting); retry later.")
    owner = current_owner()
    queued, owner_pages = c.jobs.backlog(owner)
    if queued + size > c.settings.max_queued_bytes:
        raise QueueFull(f"The queue holds {queued} bytes of documents, its limit is {c.settings.max_queued_bytes}; "
                        "retry later.")
    backlog = owner_pages + pages
    if owner and backlog > c.settings.max_key_pages:
        # One key cannot take the whole queue: its own bound, others unaffected.
        raise QueueFull(f"This API key has {backlog - pages} pages waiting, its limit is {c.settings.max_key_pages}; "
                        "retry later.", code="key_queue_full")
    return backlog


def _enqueue(job: Job, priority: int) -> None:
    c = ctx()
    producer_app = c.producer
    # One task per page: pages of every job meet in a GPU worker's batch, and a PDF spreads over workers.
    with producer_app.producer_or_acquire() as producer:
        for page in range(job.pages_total):
            producer_app.send_task(OCR_PAGE_TASK, args=[job.id, page], queue=c.settings.queue, producer=producer,
                                   priority=priority)


@bp.get("/<job_id>")
def get(job_id: str):
    wait = _wait_param()
    job = _load(job_id)
    if wait > 0 and not job.final:
        job = ctx().jobs.wait(job.id, wait) or _gone(job_id)
    return jsonify(job.to_api())


@bp.get("/<job_id>/result")
def result(job_id: str):
    c = ctx()
    job = _load(job_id)
    if job.status is JobStatus.FAILED:
        raise Conflict(f"The job failed ({job.error_code}): {job.error_message}", code="job_failed")
    if job.status is JobStatus.CANCELLED:
        raise Conflict("The job was cancelled; it has no result.", code="job_cancelled")
    if job.status is not JobStatus.SUCCEEDED:
        raise Conflict(f"The job is {job.status.value}; poll {job.to_api()['links']['self']} until it succeeds.",
                       code="not_ready")
    pages = c.jobs.pages(job.id)
    if _wants_markdown():
        return Response(result_text(pages), mimetype="text/markdown", content_type="text/markdown; charset=utf-8")
    return jsonify(result_object(job, pages))


@bp.post("/<job_id>/cancel")
def cancel(job_id: str):
    c = ctx()
    job = _load(job_id)
    if c.jobs.cancel(job.id) is Ending.ENDED and job.callback_url:
        c.producer.send_task(DELIVER_WEBHOOK_TASK, args=[job.id], queue=events_queue(c.settings))
    # Like a 202, a 200 only once a failover cannot undo it: a cancel lost with the primary let the job run
    # on and succeed. Unconfirmed, 503: sent again it finds the job cancelled, and confirms that.
    c.confirm_changed("cancel")
    return jsonify((c.jobs.get(job.id) or _gone(job_id)).to_api())


@bp.delete("/<job_id>")
def delete(job_id: str):
    c = ctx()
    try:
        job = _load(job_id)
    except NotFound:  # a repeat of a deletion answered 503 too answers only once no failover can undo it
        c.confirm_changed("delete")
        raise
    c.jobs.delete(job.id)
    c.confirm_changed("delete")  # a deletion a failover undid would bring the document back
    return Response(status=204)


def _load(job_id: str) -> Job:
    job = ctx().jobs.get(job_id) if _JOB_ID.match(job_id) else None
    # Another key's job is reported exactly like a missing one, so ids cannot be probed.
    if job is None or job.owner != current_owner():
        _gone(job_id)
    return job


def _gone(job_id: str):
    raise NotFound(f"No job {job_id!r}: it was never issued, or it expired or was deleted.")


def _wait_param() -> float:
    raw = request.args.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1
    if not 0 <= wait <= DEFAULT_WAIT_MAX:
        raise BadRequest(f"wait must be a number of seconds from 0 to {DEFAULT_WAIT_MAX}.", code="invalid_parameter")
    return wait


def _wants_markdown() -> bool:
    fmt = request.args.get("format")
    if fmt is not None:
        if fmt not in ("json", "markdown"):
            raise BadRequest("format must be json or markdown.", code="invalid_parameter")
        return fmt == "markdown"
    best = request.accept_mimetypes.best_match(["application/json", "text/markdown"])
    return best == "text/markdown" and request.accept_mimetypes["text/markdown"] > request.accept_mimetypes[
        "application/json"]


def clean_filename(name: str | None) -> str:
    """A display name only: path parts, control characters and NULs removed, length bounded."""
    if not name:
        return ""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").split("/")[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    return name.strip().lstrip(".")[:255]
