"""The job record: ours, in Redis, written at submit time, kept while live, expired a TTL after it ends.

Every state change is one Lua script, so a cancel racing a last page, or a
redelivered page racing its first delivery, can never leave two answers.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import redis

from . import job_scripts as scripts
from . import keys
from .inputstore import InputStore, RedisInputs
from .options import Options
from .result import PageResult


class ClaimLost(Exception):
    """CREATE found the job's Idempotency-Key claimed by another request: nothing was written."""


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Job:
    id: str
    status: JobStatus
    created_at: str
    started_at: str | None
    finished_at: str | None
    pages_total: int
    pages_done: int
    kind: str
    owner: str
    attempts: int
    error_code: str | None = None
    error_message: str | None = None
    model_id: str | None = None
    model_revision: str | None = None
    filename: str | None = None
    callback_url: str | None = None
    options_raw: str | None = None
    batch: str | None = None  # the batch whose document this job reads

    @property
    def final(self) -> bool:
        return self.status.final

    @property
    def options(self) -> Options:
        return Options.from_record(self.options_raw)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Job:
        return cls(
            id=h["id"],
            status=JobStatus(h["status"]),
            created_at=h["created_at"],
            started_at=h.get("started_at") or None,
            finished_at=h.get("finished_at") or None,
            pages_total=int(h["pages_total"]),
            pages_done=int(h.get("pages_done", 0)),
            kind=h["kind"],
            owner=h.get("owner", ""),
            attempts=int(h.get("attempts", 0)),
            error_code=h.get("error_code") or None,
            error_message=h.get("error_message") or None,
            model_id=h.get("model_id") or None,
            model_revision=h.get("model_revision") or None,
            filename=h.get("filename") or None,
            callback_url=h.get("callback_url") or None,
            options_raw=h.get("options") or None,
            batch=h.get("batch") or None,
        )

    def to_api(self) -> dict:
        error = {"code": self.error_code, "message": self.error_message} if self.error_code else None
        return {
            "id": self.id,
            "status": self.status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "pages_total": self.pages_total,
            "pages_done": self.pages_done,
            "attempts": self.attempts,
            "filename": self.filename,
            "callback_url": self.callback_url,
            "error": error,
            "links": {"self": f"/v1/jobs/{self.id}", "result": f"/v1/jobs/{self.id}/result"},
        }


class Verdict(str, enum.Enum):
    """What a page delivery found when it tried to claim its page."""

    RUN = "run"  # claimed: run it
    GONE = "gone"  # the job was deleted
    FINAL = "final"  # the job already ended (cancelled, failed)
    DONE = "done"  # this page was recorded by an earlier delivery
    EXHAUSTED = "exhausted"  # past GNOSIS_PAGE_MAX_ATTEMPTS: this call failed the job with worker_lost


class Recorded(str, enum.Enum):
    """What recording a page's text did."""

    RECORDED = "recorded"
    GONE = "gone"
    FINAL = "final"
    DUPLICATE = "duplicate"  # another delivery recorded it first


class Ending(str, enum.Enum):
    """What asking to end a job did (fail, cancel, expire)."""

    ENDED = "ended"  # this call ended it: its webhook and counts are this caller's to send
    FINAL = "final"  # it had ended already
    YOUNG = "young"  # not past the max age this call was for
    GONE = "gone"


@dataclass(frozen=True)
class Claim:
    verdict: Verdict
    data: bytes | None = None
    kind: str | None = None
    options: Options = field(default_factory=Options)
    deaths: int = 0
    """Engine deaths the page was on a device for (`release_page(death=True)`)."""


@dataclass(frozen=True)
class PageRecord:
    outcome: Recorded
    done: int
    total: int

    @property
    def completed_job(self) -> bool:
        return self.outcome is Recorded.RECORDED and self.done >= self.total


def owner_backlogs(client: redis.Redis) -> dict[str, int]:
    """Pages of live jobs not yet done, per owner, in two round trips (what an autoscaler reads)."""
    owners = sorted(o.decode() for o in client.smembers(keys.OWNERS))
    counts = client.mget([keys.owner_pages(o) for o in owners]) if owners else []
    return {owner: max(0, int(n or 0)) for owner, n in zip(owners, counts, strict=True)}


class JobStore:
    """Job records, inputs and page results in Redis."""

    def __init__(self, client: redis.Redis, *, ttl: int, max_attempts: int, inputs: InputStore | None = None) -> None:
        self.redis = client
        self.ttl = ttl
        self.max_attempts = max_attempts
        self.inputs = inputs or RedisInputs(client)
        self._create = client.register_script(scripts.CREATE)
        self._start = client.register_script(scripts.START_PAGE)
        self._release = client.register_script(scripts.RELEASE_PAGE)
        self._finish_page = client.register_script(scripts.FINISH_PAGE)
        self._finish_job = client.register_script(scripts.FINISH_JOB)
        self._overdue = client.register_script(scripts.OVERDUE)
        self._discard = client.register_script(scripts.DISCARD)
        self._vouch = client.register_script(scripts.VOUCH)

    @staticmethod
    def _keys(job_id: str, *more: str) -> list[str]:
        """The keys every job script takes, in the order job_scripts._KEYS names them."""
        return [keys.job(job_id), keys.job_input(job_id), keys.job_pages(job_id), keys.job_attempts(job_id),
                keys.job_events(job_id), keys.LIVE_JOBS, keys.QUEUED_BYTES, keys.WEBHOOK_OUTBOX, keys.BATCH_ENDS,
                keys.OWNERS, *more]

    @staticmethod
    def _args(*args: object) -> list[object]:
        return [*keys.OWNER_PAGES, *args]

    def create(self, *, data: bytes | None, kind: str, pages: int, owner: str = "", filename: str | None = None,
               job_id: str | None = None, extra: dict[str, str] | None = None, idem_claim: str = "") -> Job:
        """Store a new queued job and its input. It has no expiry until it is final. With an idempotency
        key (`extra["idem_key"]`), only while the key still holds `idem_claim`: else ClaimLost. `data` None:
        the document stays where it is (a batch's object in its bucket) and workers read it there."""
        job_id = job_id or new_job_id()
        record = {
            "id": job_id,
            "status": JobStatus.QUEUED.value,
            "created_at": now_rfc3339(),
            "pages_total": pages,
            "pages_done": 0,
            "attempts": 0,
            "kind": kind,
            "owner": owner,
            "filename": filename or "",
            **(extra or {}),
        }
        pairs = [str(item) for pair in record.items() for item in pair]
        # Outside Redis, the file is written first: a record never points at an input not yet there.
        if data is not None:
            self.inputs.put(job_id, data)
        try:
            created = self._create(keys=self._keys(job_id), args=self._args(
                job_id, data if data and self.inputs.in_redis else b"", len(data or b""), record.get("idem_key", ""),
                pages, owner, idem_claim, *pairs))
            if int(created) == -1:
                raise ClaimLost(f"the Idempotency-Key of job {job_id} was taken over before the job was written")
        except BaseException:
            if data is not None:
                self.inputs.delete(job_id)
            raise
        return Job.from_hash({key: str(value) for key, value in record.items()})

    def backlog(self, owner: str) -> tuple[int, int]:
        """(input bytes of every live job, pages of this owner's live jobs not yet done), in one round trip."""
        queued, pages = self.redis.mget(keys.QUEUED_BYTES, keys.owner_pages(owner))
        return int(queued or 0), int(pages or 0)

    def get(self, job_id: str) -> Job | None:
        h = self.redis.hgetall(keys.job(job_id))
        if not h:
            return None
        return Job.from_hash({key.decode(): value.decode() for key, value in h.items()})

    def field(self, job_id: str, name: str) -> str | None:
        value = self.redis.hget(keys.job(job_id), name)
        return value.decode() if value is not None else None

    def statuses(self, job_ids: Sequence[str]) -> list[str | None]:
        """Each job's status (None for a job that is gone), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "status")
        return [value.decode() if value is not None else None for value in pipe.execute()]

    def fetch_input(self, job_id: str) -> bytes | None:
        """The job's document, wherever GNOSIS_INPUT_STORE keeps it; None once it is gone."""
        return self.inputs.fetch(job_id)

    def start_page(self, job_id: str, page: int, *, inflight: tuple[str, str, str], want_input: bool = True,
                   token: str = "") -> Claim:
        """Claim a delivery of a page; `inflight` is the worker's in-flight (hash, field, value).

        With `want_input` false the caller already holds the document, and Redis sends none of it.
        `token` names this delivery: the call repeated with it (a reply lost, the client retrying)
        counts one attempt, not two.
        """
        key, field, value = inflight
        result = self._start(keys=self._keys(job_id, key),
                             args=self._args(page, now_rfc3339(), self.max_attempts, field, value, int(want_input),
                                             self.ttl, token))
        verdict = Verdict(result[0].decode())
        if verdict is Verdict.EXHAUSTED:
            self._input_done(job_id)
        if verdict is not Verdict.RUN:
            return Claim(verdict)
        return Claim(verdict, data=result[1] or None, kind=result[2].decode() if result[2] else None,
                     options=Options.from_record(result[3] if len(result) > 3 else None),
                     deaths=int(result[4]) if len(result) > 4 else 0)

    def release_page(self, job_id: str, page: int, *, inflight: tuple[str, str, str], token: str,
                     death: bool = False) -> bool:
        """Give back the claim `token` made of a page that did not run: its attempt, and its in-flight
        entry; with `death`, count an engine death it was on the device for instead. False if there was
        none to give back (the same call again)."""
        return bool(self._release(keys=self._keys(job_id, inflight[0]),
                                  args=self._args(page, inflight[1], token, int(death))))

    def finish_page(self, job_id: str, page: int, text: str, *, model_id: str, model_revision: str,
                    inflight: tuple[str, str, str], truncated: bool = False, token: str = "") -> PageRecord:
        """Record a page's text once; repeated with the same `token`, the first call's answer again."""
        outcome, done, total = self._finish_page(
            keys=self._keys(job_id, inflight[0]),
            args=self._args(page, text, now_rfc3339(), model_id, model_revision, self.ttl, inflight[1], int(truncated),
                            token))
        record = PageRecord(Recorded(outcome.decode()), int(done), int(total))
        if record.completed_job:
            self._input_done(job_id)
        return record

    def fail(self, job_id: str, code: str, message: str) -> Ending:
        return self._end(job_id, JobStatus.FAILED, code, message)

    def cancel(self, job_id: str) -> Ending:
        return self._end(job_id, JobStatus.CANCELLED, "", "")

    def _end(self, job_id: str, status: JobStatus, code: str, message: str, *, max_age_ms: int = 0) -> Ending:
        ending = Ending(self._finish_job(keys=self._keys(job_id), args=self._args(
            status.value, now_rfc3339(), code, message, self.ttl, max_age_ms)).decode())
        if ending is Ending.ENDED:
            self._input_done(job_id)
        return ending

    def _input_done(self, job_id: str) -> None:
        """The job ended. Its input in Redis went with the script that ended it; one in a shared directory
        goes later (`delete_ended_inputs`): a failover can lose the ending (a graceful one leaves the old
        primary writable for seconds), the page then runs again, and it must find its document. Written
        after the ending on the same primary, the mark is never on a replica that lacks the ending."""
        if self.inputs.in_redis:
            self.inputs.delete(job_id)
        else:
            self.redis.zadd(keys.INPUTS_ENDED, {job_id: int(self.redis.time()[0])})

    def delete_ended_inputs(self, grace: float, *, limit: int = 500) -> int:
        """Delete the inputs of jobs final for `grace` seconds or more (gone ones too; a job live again
        keeps its input). Returns how many were deleted."""
        due = self.redis.zrangebyscore(keys.INPUTS_ENDED, "-inf", int(self.redis.time()[0]) - grace,
                                       start=0, num=limit)
        deleted = 0
        for raw in due:
            job_id = raw.decode()
            if self.field(job_id, "status") not in ("queued", "running"):
                self.inputs.delete(job_id)
                deleted += 1
            self.redis.zrem(keys.INPUTS_ENDED, job_id)
        return deleted

    def expire_overdue(self, max_age: float, *, limit: int = 100) -> list[str]:
        """Fail live jobs older than `max_age` seconds with `expired`: the ids this call ended."""
        ended = []
        max_age_ms = int(max_age * 1000)
        for raw in self._overdue(keys=[keys.LIVE_JOBS], args=[max_age_ms, limit]):
            job_id = raw.decode()
            message = f"The job did not finish within {max_age:g} seconds of its submission (GNOSIS_JOB_MAX_AGE)."
            ending = self._end(job_id, JobStatus.FAILED, "expired", message, max_age_ms=max_age_ms)
            if ending is Ending.ENDED:
                ended.append(job_id)
            elif ending is Ending.GONE:
                self.redis.zrem(keys.LIVE_JOBS, job_id)  # deleted by hand, or lost with an old Redis
        return ended

    def delete(self, job_id: str) -> bool:
        """Cancel if needed (waking long-polls and stopping workers), then remove everything."""
        self.cancel(job_id)
        return self.discard(job_id)

    def discard(self, job_id: str) -> bool:
        """Remove the record, input, results and idempotency key, with no state change on the way."""
        self.inputs.delete(job_id)
        return bool(self._discard(keys=self._keys(job_id), args=self._args("")))

    def abandon(self, job_id: str) -> bool:
        """A submission that failed after CREATE takes its job back: discarded, unless a retry with its
        Idempotency-Key has already answered with it (`vouch`), when it stays and False is returned.
        Without that rule the retry's client would hold the id of a job that no longer exists."""
        if int(self._discard(keys=self._keys(job_id), args=self._args("1"))) == -1:
            return False
        self.inputs.delete(job_id)  # after the record: a worker finds the job gone, never the input
        return True

    def vouch(self, job_id: str) -> bool:
        """Before a retry answers with the job its Idempotency-Key names: False when the first request
        abandoned it first (the key is then free to take over)."""
        return bool(self._vouch(keys=[keys.job(job_id)]))

    def pages(self, job_id: str) -> list[PageResult]:
        raw = {field.decode(): value for field, value in self.redis.hgetall(keys.job_pages(job_id)).items()}
        cut = {field[2:] for field in raw if field.startswith("t:")}  # pages cut short: "t:<page>" = 1
        return [PageResult(raw[page].decode(), page in cut)
                for page in sorted((f for f in raw if not f.startswith("t:")), key=int)]

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once final, or as it stands after `timeout` seconds; woken by its events, not polled."""
        job = self.get(job_id)
        if job is None or job.final or timeout <= 0:
            return job
        deadline = time.monotonic() + timeout
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(keys.job_events(job_id))
            job = self.get(job_id)  # re-read: an event may have fired before the subscription
            while job is not None and not job.final:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if pubsub.get_message(timeout=remaining) is not None:
                    job = self.get(job_id)
            return job
        finally:
            pubsub.close()
