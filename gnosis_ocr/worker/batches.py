"""A batch on the worker side: list its source and make a job per document (a light worker's task),
and, when a batch's job ends, write its result to the destination and count it."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime, timezone

import redis

from .. import document, gcs, keys, options
from ..batch import BatchStore, Settlement
from ..broker import OCR_PAGE_TASK, page_priority
from ..errors import GnosisError, QueueFull, UnreadableDocument
from ..job import Job, JobStatus
from ..result import result_object, result_text
from . import breaker
from .runtime import Runtime

log = logging.getLogger(__name__)

CHECK_EVERY = 20
"""Documents listed between two looks at whether the batch was cancelled."""

BATCH_MARK = "_gnosis_batch.json"
"""Written into a batch's destination when its listing begins: which batch writes there, from which
source, and proof that it may."""

RESULT_BATCH = "gnosis-batch"
"""Custom metadata of a result's `.json`: the batch that wrote it. A listing run again after a failover
finds results its own batch wrote on the old primary (their jobs are gone from the new one): those
documents are done, not skipped as an earlier batch's would be."""

WAIT_FOR_ROOM = 2.0
"""Seconds between two looks at the key's backlog while a batch waits for room under its bound."""


class ListingInterrupted(Exception):
    """Redis or the bucket failed while a batch was listed, or the worker is stopping: its task goes back
    to the queue."""


stopping = threading.Event()
"""Set when this worker begins its warm shutdown (tasks.py): a listing, which can wait hours under its
key's page bound, hands its batch back to the queue rather than hold the worker's exit up."""


def store(rt: Runtime) -> BatchStore:
    return BatchStore(rt.redis, ttl=rt.settings.job_ttl)


def expand(rt: Runtime, batch_id: str, app) -> str:
    """Make the batch's jobs, a listing page at a time; the batch's status when done. Documents are
    inspected GNOSIS_LISTING_THREADS at a time, each a few bucket round trips; their jobs are made one
    at a time, in the listing thread's lock, so the key's page bound holds exactly."""
    batches = store(rt)
    batch = batches.get(batch_id)
    if batch is None or batch.final:
        return "gone" if batch is None else batch.status
    source, destination = gcs.parse(batch.source), gcs.parse(batch.destination)
    refused = _mark_destination(rt, batches, batch, destination)
    if refused is not None:
        # Before a single page runs: otherwise every document would be read, recognised and then fail.
        log.error("batch %s: %s", batch_id, refused)
        if batches.end(batch_id, JobStatus.FAILED.value, code="destination_unwritable", message=refused):
            _announce(rt, batch_id)
        return JobStatus.FAILED.value
    listing = _Listing(rt, app, batch, source, destination)
    pool = ThreadPoolExecutor(rt.settings.listing_threads, thread_name_prefix=f"listing-{batch_id[:8]}")
    pending: set[Future] = set()
    taken = seen = 0
    try:
        for n, (name, size) in enumerate(gcs.iter_names(source)):
            if stopping.is_set():
                raise ListingInterrupted(f"batch {batch_id}: this worker is stopping")
            if n % CHECK_EVERY == 0 and ((now := batches.get(batch_id)) is None or now.final):
                return "stopped"
            rel = gcs.relative_name(name, source)
            if rel is None:
                continue  # a folder placeholder, or a name that must never become a path
            seen += 1  # each is made into a job or counted, once, under its name (the made set)
            if taken >= rt.settings.max_batch_documents:
                _ended(rt, batches, batch_id, "skipped", name=rel, listing=True)
                continue
            taken += 1
            if batches.made(batch_id, rel):
                # Dealt with by an earlier run of this listing (interrupted, or its light worker died):
                # not a bucket call again, which for a large batch relisted would be hours of them.
                continue
            pending.add(pool.submit(listing.document, name, size, rel))
            if len(pending) >= 2 * rt.settings.listing_threads:  # the listing reads ahead this far, no further
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
        done, pending = wait(pending)
        for future in done:
            future.result()
    except ListingInterrupted:
        raise
    except Exception as exc:
        if isinstance(exc, redis.RedisError) or gcs.transient(exc):
            # Redis or the bucket failing for now: the listing runs again later, from the start; what
            # it made or counted already it skips (the made set).
            if not isinstance(exc, redis.RedisError):
                bucket_failed(rt, "list")
            raise ListingInterrupted(f"batch {batch_id}: listing {batch.source} was interrupted: "
                                     f"{type(exc).__name__}: {exc}") from exc
        # The listing itself failed for good (the bucket is gone, no permission): the batch fails.
        log.exception("batch %s: listing %s failed", batch_id, batch.source)
        if batches.end(batch_id, JobStatus.FAILED.value, code="source_unreadable",
                       message=f"Listing {batch.source} failed: {exc}"):
            _announce(rt, batch_id)
        return JobStatus.FAILED.value
    finally:
        listing.over.set()  # a document waiting for room under the key's bound gives up too
        pool.shutdown(wait=True, cancel_futures=True)
    settlement = batches.listed(batch_id, seen)
    if settlement is None:
        # This listing ran partly on a primary that a failover lost, with the documents it made there.
        raise ListingInterrupted(f"batch {batch_id}: {seen} documents listed, fewer of them made on this Redis "
                                 f"(a failover lost some); listing it again")
    return _settled(rt, batch_id, settlement)


def _mark_destination(rt: Runtime, batches: BatchStore, batch, destination: gcs.Location) -> str | None:
    """Write BATCH_MARK into the destination (which batch writes there, from where): a destination the
    service may not write to is found before the listing, not after every document was recognised.
    The reason if it is refused; None if written (once a batch: a listing run again skips it), or if
    the bucket only fails for now (its results then wait owed, as any result's would)."""
    if batch.marked:
        return None
    mark = {"batch": batch.id, "source": batch.source, "destination": batch.destination,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")}
    try:
        gcs.write(destination.bucket, destination.join(BATCH_MARK), json.dumps(mark).encode(), "application/json")
    except Exception as exc:
        if gcs.transient(exc):
            bucket_failed(rt, "write")
            log.warning("batch %s: could not write %s for now (%s); listing it all the same", batch.id,
                        destination.join(BATCH_MARK), exc)
            return None
        return f"Writing to {batch.destination} failed, so no result could be written there: {exc}"
    batches.note_marked(batch.id)  # a Redis error here sends the listing back, as any in the listing would
    return None


def bucket_failed(rt: Runtime, operation: str) -> None:
    """Count a bucket call that failed for now (`list`, `read`, `write`): an outage shows on /metrics."""
    _inc(rt, "gnosis_bucket_failures_total", operation=operation)


def _ended(rt: Runtime, batches: BatchStore, batch_id: str, outcome: str, **fields) -> Settlement:
    settlement = batches.end_document(batch_id, outcome, **fields)
    if settlement.counted:  # a repeat (a listing run again, a job counted twice) is no document more
        _count(rt, outcome)
    return settlement


def _count(rt: Runtime, outcome: str) -> None:
    _inc(rt, "gnosis_batch_documents_total", outcome=outcome)


def _inc(rt: Runtime, metric: str, **labels: str) -> None:
    try:
        rt.metrics.inc(metric, **labels)
    except Exception as exc:  # a missed count, never a stopped batch
        log.warning("could not count %s: %s", metric, exc)


def _settled(rt: Runtime, batch_id: str, settlement: Settlement) -> str:
    """The batch's status; the one call that made the batch final announces it."""
    if settlement.ended_now:
        _announce(rt, batch_id)
    return settlement.status


def _announce(rt: Runtime, batch_id: str) -> None:
    batch = store(rt).get(batch_id)
    if batch is not None and batch.callback_url:
        from . import notify

        notify.enqueue_batch(rt, batch_id)


class _Listing:
    """One run of a batch's listing: what its threads share."""

    def __init__(self, rt: Runtime, app, batch, source: gcs.Location, destination: gcs.Location) -> None:
        self.rt, self.app, self.batch, self.source, self.destination = rt, app, batch, source, destination
        self.batches = store(rt)
        self.opts = options.Options.from_record(batch.options)
        self.wanted = options.parse_pages(self.opts.pages) if self.opts.pages else None
        self.making = threading.Lock()
        self.over = threading.Event()
        """Set when the run ends, however: a thread still waiting for room stops waiting."""

    def document(self, name: str, size: int, rel: str) -> None:
        """Skip, fail or make a job of one listed document (on one of the listing's threads)."""
        rt, batch, batch_id = self.rt, self.batch, self.batch.id
        result = rel + ".json"  # a document named _gnosis_batch would find the batch's mark there, not its result
        if not batch.overwrite and result != BATCH_MARK and (
                written := gcs.metadata(self.destination.bucket, self.destination.join(result))) is not None:
            # Done by an earlier batch, or by this one on a node that a failover lost.
            outcome = "done" if written.get(RESULT_BATCH) == batch_id else "skipped"
            _ended(rt, self.batches, batch_id, outcome, name=rel, listing=True)
            return
        kind = document.sniff(gcs.head(self.source.bucket, name)) if size else None
        if kind is None:
            _ended(rt, self.batches, batch_id, "skipped", name=rel, listing=True)  # not a document, by content
            return
        try:
            kind, pages, job_opts = self._count(name, kind)
            with self.making:  # one job at a time: the key's bound is checked against what was made
                self._make_job(rel, kind, pages, job_opts)
        except GnosisError as exc:
            _ended(rt, self.batches, batch_id, "failed", name=rel, code=exc.code, message=exc.message, listing=True)

    def _count(self, name: str, kind: str) -> tuple[str, int, options.Options]:
        """The document's kind, its pages, and its job's options: from the ranges that hold its pages (the
        page workers download the whole object)."""
        rt, bucket = self.rt, self.source.bucket

        def inspect(stream) -> document.DocumentInfo:
            return document.inspect(stream, max_pages=rt.settings.max_pages, max_pixels=rt.settings.max_pixels)

        try:
            with gcs.open_ranged(bucket, name, max_bytes=rt.settings.max_upload_bytes) as stream:
                # A PDF is counted under pdfium's one lock: its ranges are fetched ahead, outside it.
                info = stream.fetch_ahead(inspect) if kind == "pdf" else inspect(stream)
        except GnosisError:
            raise
        except Exception as exc:
            if gcs.transient(exc):
                raise  # not the document's fault: the listing is interrupted and runs again
            # Deleted since it was listed, or refused: this document fails, not the batch.
            raise UnreadableDocument(f"gs://{bucket}/{name} could not be read: {exc}",
                                     code="source_unreadable") from None
        # The page workers read the generation counted here: a document replaced in between is read as
        # counted where the bucket keeps older generations, and otherwise fails its job (input_missing),
        # never read as pages of another.
        uri = f"gs://{bucket}/{name}#{stream.generation}"
        page_map = options.select(self.wanted, info.pages) if self.wanted else ()
        job_opts = options.Options(pages=self.opts.pages, page_map=page_map, language=self.opts.language, source=uri)
        pages = len(page_map) or info.pages
        if pages > rt.settings.max_key_pages > 0 and self.batch.owner:
            raise QueueFull(f"The document has {pages} pages, more than this key may have waiting "
                            f"({rt.settings.max_key_pages}).", code="key_queue_full")
        return info.kind, pages, job_opts

    def _wait_for_room(self, pages: int) -> bool:
        """Hold the listing while the key's pages waiting would pass GNOSIS_MAX_KEY_PAGES, as the API would
        refuse them: a batch queues behind its own key's bound, never past it. False if the batch ended."""
        rt, owner = self.rt, self.batch.owner
        while owner and rt.jobs.backlog(owner)[1] + pages > rt.settings.max_key_pages:
            batch = self.batches.get(self.batch.id)
            if batch is None or batch.final or self.over.is_set():
                return False
            if stopping.wait(WAIT_FOR_ROOM):  # the backlog drains page by page; nothing else to be woken by
                raise ListingInterrupted(f"batch {self.batch.id}: this worker is stopping")
        return True

    def _make_job(self, rel: str, kind: str, pages: int, job_opts: options.Options) -> None:
        rt, app, batch = self.rt, self.app, self.batch
        if not self._wait_for_room(pages):
            return
        # The bytes stay in the bucket: page workers read the object themselves, Redis carries none of it.
        job = rt.jobs.create(data=None, kind=kind, pages=pages, owner=batch.owner, filename=rel,
                             extra={"options": job_opts.to_record(), "batch": batch.id})
        # The job first, then its document marked made with its count, in one step: a crash in between
        # costs a job that is no one's, never a document lost or counted twice.
        if not self.batches.add_job(batch.id, job.id, rel):
            rt.jobs.discard(job.id)  # the batch was cancelled, or another listing made this document's job
            return
        # Prioritised by the key's backlog like any job: a batch's thousands of pages never starve a small
        # interactive job of another key.
        priority = page_priority(rt.jobs.backlog(batch.owner)[1])
        with app.producer_or_acquire() as producer:
            for page in range(pages):
                app.send_task(OCR_PAGE_TASK, args=[job.id, page], queue=rt.settings.queue, producer=producer,
                              priority=priority)


def document_ended(rt: Runtime, job: Job, *, housekeeping: bool = False) -> bool:
    """A batch's job is final: its result into the destination, then the batch's count (once, whoever
    calls: its worker, or the housekeeper after that worker died in between). False if the bucket
    failed for now: the document stays owed and the housekeeper writes it later (recover)."""
    batch_id = job.batch
    if not batch_id:
        return True
    batches = store(rt)
    batch = batches.get(batch_id)
    if batch is None:
        rt.redis.zrem(keys.BATCH_ENDS, job.id)
        return True
    rel = job.filename or job.id
    if job.status is JobStatus.SUCCEEDED:
        destination = gcs.parse(batch.destination)
        # A page thread writes only while the bucket answers, or as its one probe since it failed; the
        # housekeeper (`housekeeping`) always tries. One that would be refused reads no text from Redis.
        if not housekeeping and rt.result_writes.refusing(destination.bucket):
            return _left_owed(rt, job, destination, rel)
        pages = rt.jobs.pages(job.id)
        try:
            with rt.result_writes.call(destination.bucket, hold=2 * rt.settings.bucket_timeout, force=housekeeping):
                gcs.write(destination.bucket, destination.join(rel + ".md"), result_text(pages).encode(),
                          "text/markdown; charset=utf-8")
                # Written last: its presence is what a resubmitted batch takes for "done".
                gcs.write(destination.bucket, destination.join(rel + ".json"),
                          json.dumps(result_object(job, pages), ensure_ascii=False).encode(), "application/json",
                          metadata={RESULT_BATCH: batch_id})
        except breaker.Open:  # the probe was taken in between
            return _left_owed(rt, job, destination, rel)
        except Exception as exc:
            if gcs.transient(exc) and not _written_too_long(rt, job):
                log.warning("batch %s: could not write the result of %s for now; trying again later: %s",
                            batch_id, rel, exc)
                bucket_failed(rt, "write")
                _owe(rt, job.id)
                return False
            # Refused (no permission, no such bucket), or failing for so long that the text would expire
            # first: the document fails, named, and the batch goes on.
            log.error("batch %s: could not write the result of %s: %s", batch_id, rel, exc)
            _settled(rt, batch_id, _ended(rt, batches, batch_id, "failed", name=rel, job_id=job.id,
                                          code="destination_unwritable", message=str(exc)))
            return True
        _settled(rt, batch_id, _ended(rt, batches, batch_id, "done", job_id=job.id))
    elif job.status is JobStatus.FAILED:
        _settled(rt, batch_id, _ended(rt, batches, batch_id, "failed", name=rel, job_id=job.id,
                                      code=job.error_code or "", message=job.error_message or ""))
    else:  # cancelled: only with its batch, which is final already
        rt.redis.zrem(keys.BATCH_ENDS, job.id)
    return True


def _left_owed(rt: Runtime, job: Job, destination: gcs.Location, rel: str) -> bool:
    log.info("batch %s: %s failed a write for now; the result of %s is left for the housekeeper", job.batch,
             destination.uri, rel)
    _owe(rt, job.id)
    return False


def _owe(rt: Runtime, job_id: str) -> None:
    """Leave the document owed, scored anew: the housekeeper's next try comes GNOSIS_RECONCILE_GRACE
    from now."""
    rt.redis.zadd(keys.BATCH_ENDS, {job_id: int(rt.redis.time()[0])}, xx=True)


def _written_too_long(rt: Runtime, job: Job) -> bool:
    """Whether the job's result has been waiting for its write for half its retention (GNOSIS_JOB_TTL):
    past it, the text it would write could expire before the bucket answers again."""
    if not job.finished_at:
        return False
    ended = datetime.fromisoformat(job.finished_at.replace("Z", "+00:00")).timestamp()
    return rt.redis.time()[0] - ended > rt.settings.job_ttl / 2


def recover(rt: Runtime, *, grace: float) -> int:
    """The housekeeper's pass: batch jobs that ended more than `grace` seconds ago and were never
    counted (their worker died between the job's end and the count, or the destination failed for
    now) are written and counted now; the pass stops at the first write the bucket fails."""
    now, _ = rt.redis.time()
    owed = [raw.decode() for raw in rt.redis.zrangebyscore(keys.BATCH_ENDS, 0, now - grace, start=0, num=200)]
    counted = 0
    for job_id in owed:
        job = rt.jobs.get(job_id)
        if job is None or not job.final:
            rt.redis.zrem(keys.BATCH_ENDS, job_id)
            continue
        if not document_ended(rt, job, housekeeping=True):
            break  # the bucket fails for now: each of the others would wait out GNOSIS_BUCKET_TIMEOUT too
        counted += 1
    if counted:
        log.warning("counted %d batch document(s) whose worker died, or whose destination failed, before "
                    "counting them", counted)
    return counted
