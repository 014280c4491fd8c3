"""Every Redis key this service writes, named in one place (as rq's registries own theirs).

The names are what a running deployment already holds: changing one strands the live data under
the old name, so a new key is added here and an old one is never renamed. Celery's own keys (its
queues, `unacked`) are kombu's and are not listed here.
"""

from __future__ import annotations

import hashlib

PREFIX = "gnosis:"

# Jobs (job.py, job_scripts.py)


def job(job_id: str) -> str:
    """The job's record (a hash)."""
    return f"{PREFIX}job:{job_id}"


def job_input(job_id: str) -> str:
    """The document's bytes, when inputs are kept in Redis."""
    return f"{job(job_id)}:input"


def job_pages(job_id: str) -> str:
    """Page texts by page number, and `t:<page>` for pages cut short."""
    return f"{job(job_id)}:pages"


def job_attempts(job_id: str) -> str:
    """Deliveries per page, and the delivery tokens that make a retried script act once."""
    return f"{job(job_id)}:attempts"


def job_events(job_id: str) -> str:
    """The pub/sub channel that wakes long-polls."""
    return f"{job(job_id)}:events"


LIVE_JOBS = f"{PREFIX}jobs:live"
"""Every job not yet final, scored by its creation time on Redis's clock: what the max-age sweep reads."""

QUEUED_BYTES = f"{PREFIX}queued_bytes"
"""Input bytes of every live job: the bound GNOSIS_MAX_QUEUED_BYTES is checked against this."""

OWNERS = f"{PREFIX}owners"
"""Every owner (API key id, '' without keys) that has submitted: one member per key, never per job."""

OWNER_PAGES = (f"{PREFIX}owner:", ":pages")
"""An owner's pages of live jobs not yet done is the key `OWNER_PAGES[0] + owner + OWNER_PAGES[1]`;
the scripts get both halves as arguments, since they learn the owner from the record."""


def owner_pages(owner: str) -> str:
    return f"{OWNER_PAGES[0]}{owner}{OWNER_PAGES[1]}"


INPUTS_ENDED = f"{PREFIX}inputs:ended"
"""Jobs whose input in a shared directory (GNOSIS_INPUT_STORE) is to go, scored by the unix second their
job ended (Redis's clock): the housekeeper deletes each once it has been final for
GNOSIS_RECONCILE_GRACE (job.py, `delete_ended_inputs`)."""

WEBHOOK_OUTBOX = f"{PREFIX}webhooks:outbox"
"""Jobs whose final webhook is owed (job ids scored by the unix second it is due): the script that
makes a job with a callback final adds it; a settled delivery removes it (worker/outbox.py)."""


def idempotency(owner: str, key: str) -> str:
    """An Idempotency-Key's claim, per owner; the key is hashed, so any printable key fits."""
    return f"{PREFIX}idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


def batch_idempotency(owner: str, key: str) -> str:
    """The same for POST /v1/batches: a key names a job or a batch, never one for the other."""
    return f"{PREFIX}idem-batch:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


# Batches (batch.py)


def batch(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}"


def batch_failed(batch_id: str) -> str:
    """Failed documents, each a JSON object, in the order they failed."""
    return f"{batch(batch_id)}:failed"


def batch_jobs(batch_id: str) -> str:
    return f"{batch(batch_id)}:jobs"


def batch_made(batch_id: str) -> str:
    """Documents (paths below the source) the listing has dealt with, made into a job or counted as
    skipped or failed: a listing run again (its light worker died, Redis failed under it) makes no
    job twice and counts no document twice."""
    return f"{batch(batch_id)}:made"


BATCH_ENDS = f"{PREFIX}batch-ends"
"""Batch jobs that ended and whose document is not counted yet (job ids scored by when they ended):
added by the script that ends the job, removed by the count itself (END_DOCUMENT), so a worker killed
in between leaves it here for the housekeeper (worker/batches.recover)."""

BATCHES_UNLISTED = f"{PREFIX}batches:unlisted"
"""Batches whose listing has not finished (ids scored by when they were created, Redis's unix seconds):
written with the batch, removed once it is listed or ended; the housekeeper publishes the listing of one
that no message or worker holds again (worker/listings.py)."""

BATCH_OUTBOX = f"{PREFIX}webhooks:batch-outbox"
"""Final batches whose webhook is owed, as WEBHOOK_OUTBOX for jobs (worker/outbox.py drains both)."""

# Workers (worker/registry.py, worker/reconcile.py)

WORKERS = f"{PREFIX}workers"
"""Every registered worker id (a sorted set scored by registration time, for listing only)."""

REAPER_LOCK = f"{PREFIX}reaper"

WRITE_PROBE = f"{PREFIX}write-probe"
"""A key a starting worker writes (and lets expire at once) to learn whether Redis takes writes."""


def worker(worker_id: str) -> str:
    """The worker's heartbeat record (JSON), expiring when it stops beating."""
    return f"{PREFIX}worker:{worker_id}"


def worker_inflight(worker_id: str) -> str:
    """The pages the worker has claimed and not yet recorded."""
    return f"{worker(worker_id)}:inflight"


def worker_engines(worker_id: str) -> str:
    return f"{worker(worker_id)}:engines"


WORKER_RECORDS = f"{PREFIX}worker:*"
"""A SCAN pattern: every worker's keys; `is_worker_record` tells its records from the rest."""


def is_worker_record(key: bytes | str) -> bool:
    """Whether a key WORKER_RECORDS matched is a worker's record, not its in-flight or engines hash."""
    return (key.decode() if isinstance(key, bytes) else key).count(":") == 2

WORKER_INFLIGHTS = f"{PREFIX}worker:*:inflight"
"""A SCAN pattern: every worker's in-flight hash."""

# The model cache (cache/)


def cache_record(model_id: str, revision: str) -> str:
    """The cache's state for one revision of a model, mirrored from its manifest (a hash)."""
    return f"{PREFIX}cache:{model_id}@{revision}:record"


def cache_ref(model_id: str, revision: str) -> str:
    """The commit sha a branch or tag revision was resolved to by a downloader."""
    return f"{PREFIX}cache:{model_id}@{revision}:ref"


def cache_warm_requested(model_id: str, revision: str) -> str:
    """Set (with an expiry) while a warm-up of this revision is queued: one queued at a time."""
    return f"{PREFIX}cache:{model_id}@{revision}:warm_requested"


def cache_lease(model_id: str) -> str:
    """The download lease's name, one per repository, not per revision: `main` and the sha it resolves
    to share blobs, and two downloaders would sweep each other's partial files. cache/lease.py keeps
    `<name>:lease`, `<name>:fence` and the channel `<name>:events` under it."""
    return f"{PREFIX}cache:{model_id}"


# Everything else

DEPLOYMENT = f"{PREFIX}deployment"
"""This deployment's id: the namespace of its inputs in a shared directory."""

METRIC_COUNTERS = f"{PREFIX}metrics:counters"
METRIC_HISTOGRAMS = f"{PREFIX}metrics:histograms"
