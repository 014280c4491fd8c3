"""The job record: ours, in Redis, written at submit time and expired with the job's TTL.

Every state change is one Lua script, so a cancel racing a last page, or a
redelivered page racing its first delivery, can never leave two answers.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import redis

PREFIX = "gnosis:"


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


def _keys(job_id: str) -> dict[str, str]:
    base = f"{PREFIX}job:{job_id}"
    return {
        "record": base,
        "input": f"{base}:input",
        "pages": f"{base}:pages",
        "attempts": f"{base}:attempts",
        "events": f"{base}:events",
    }


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

    @property
    def final(self) -> bool:
        return self.status.final

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


_FINAL = "local st = redis.call('HGET', KEYS[1], 'status') " \
         "local final = (st == 'succeeded' or st == 'failed' or st == 'cancelled') "

# One round trip per page start and one per page end: these run for every page of every job.

# KEYS: record, pages, attempts, events, input, inflight.
# ARGV: page, now, max_attempts, inflight field, inflight value.
# Returns {verdict} or {'run', input, kind}; on 'run' the page is listed in its worker's in-flight hash.
_START_PAGE = _FINAL + """
local field = ARGV[4]
if not st or final or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[6], field)
  if not st then return {'gone'} end
  if final then return {'final'} end
  return {'done'}
end
local n = redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[3], redis.call('PTTL', KEYS[1]))
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if n > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[2], 'error_code', 'worker_lost',
    'error_message', 'Page ' .. (tonumber(ARGV[1]) + 1) .. ' was delivered ' .. (n - 1) ..
    ' times and its worker never finished it; the job was stopped.')
  redis.call('DEL', KEYS[5])
  redis.call('HDEL', KEYS[6], field)
  redis.call('PUBLISH', KEYS[4], 'failed')
  return {'exhausted'}
end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2])
  redis.call('PUBLISH', KEYS[4], 'running')
end
redis.call('HSET', KEYS[6], field, ARGV[5])
return {'run', redis.call('GET', KEYS[5]), redis.call('HGET', KEYS[1], 'kind')}
"""

# KEYS: record, pages, attempts, events, input, inflight.
# ARGV: page, text, now, model_id, model_revision, ttl, inflight field, truncated (1 or 0).
# Returns {pages done or a negative code, pages total}.
_FINISH_PAGE = _FINAL + """
redis.call('HDEL', KEYS[6], ARGV[7])
if not st then return {-1, 0} end
local total = tonumber(redis.call('HGET', KEYS[1], 'pages_total'))
if final then return {-2, total} end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return {-3, total} end
if ARGV[8] == '1' then redis.call('HSET', KEYS[2], 't:' .. ARGV[1], '1') end  -- read back by pages()
redis.call('PEXPIRE', KEYS[2], redis.call('PTTL', KEYS[1]))
local done = redis.call('HINCRBY', KEYS[1], 'pages_done', 1)
redis.call('HSET', KEYS[1], 'model_id', ARGV[4], 'model_revision', ARGV[5])
if done >= total then
  redis.call('HSET', KEYS[1], 'status', 'succeeded', 'finished_at', ARGV[3])
  redis.call('DEL', KEYS[5])
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
  local idem = redis.call('HGET', KEYS[1], 'idem_key')
  if idem and idem ~= '' then redis.call('EXPIRE', idem, ARGV[6]) end
  redis.call('PUBLISH', KEYS[4], 'succeeded')
else
  redis.call('PUBLISH', KEYS[4], 'progress')
end
return {done, total}
"""

# KEYS: record, pages, attempts, events, input. ARGV: status, now, error_code, error_message, ttl.
_FINISH_JOB = _FINAL + """
if not st then return 'gone' end
if final then return 'was_' .. st end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error_code', ARGV[3], 'error_message', ARGV[4]) end
redis.call('DEL', KEYS[5])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
local idem = redis.call('HGET', KEYS[1], 'idem_key')
if idem and idem ~= '' then redis.call('EXPIRE', idem, ARGV[5]) end
redis.call('PUBLISH', KEYS[4], ARGV[1])
return ARGV[1]
"""


@dataclass(frozen=True)
class PageResult:
    text: str
    truncated: bool = False


@dataclass(frozen=True)
class Claim:
    """A page delivery's verdict: 'run' (with the input), or 'gone', 'final', 'done', 'exhausted'."""

    verdict: str
    data: bytes | None = None
    kind: str | None = None


class JobStore:
    """Job records, inputs and page results in Redis."""

    def __init__(self, client: redis.Redis, *, ttl: int, max_attempts: int) -> None:
        self.redis = client
        self.ttl = ttl
        self.max_attempts = max_attempts
        self._start = client.register_script(_START_PAGE)
        self._finish_page = client.register_script(_FINISH_PAGE)
        self._finish_job = client.register_script(_FINISH_JOB)

    @staticmethod
    def keys(job_id: str) -> dict[str, str]:
        return _keys(job_id)

    def _k(self, job_id: str) -> list[str]:
        k = _keys(job_id)
        return [k["record"], k["pages"], k["attempts"], k["events"], k["input"]]

    def create(self, *, data: bytes, kind: str, pages: int, owner: str = "", filename: str | None = None,
               job_id: str | None = None, extra: dict[str, str] | None = None) -> Job:
        job_id = job_id or new_job_id()
        k = _keys(job_id)
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
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(k["record"], mapping=record)
        pipe.expire(k["record"], self.ttl)
        pipe.set(k["input"], data, ex=self.ttl)
        pipe.execute()
        return Job.from_hash({key: str(value) for key, value in record.items()})

    def get(self, job_id: str) -> Job | None:
        h = self.redis.hgetall(_keys(job_id)["record"])
        if not h:
            return None
        return Job.from_hash({key.decode(): value.decode() for key, value in h.items()})

    def field(self, job_id: str, name: str) -> str | None:
        value = self.redis.hget(_keys(job_id)["record"], name)
        return value.decode() if value is not None else None

    def input(self, job_id: str) -> bytes | None:
        return self.redis.get(_keys(job_id)["input"])

    def start_page(self, job_id: str, page: int, *, inflight: tuple[str, str, str]) -> Claim:
        """Claim a delivery of a page; `inflight` is the worker's in-flight (hash, field, value)."""
        key, field, value = inflight
        result = self._start(keys=[*self._k(job_id), key], args=[page, now_rfc3339(), self.max_attempts, field, value])
        verdict = result[0].decode()
        if verdict != "run":
            return Claim(verdict)
        return Claim(verdict, data=result[1] or None, kind=result[2].decode() if result[2] else None)

    def finish_page(self, job_id: str, page: int, text: str, *, model_id: str, model_revision: str,
                    inflight: tuple[str, str, str], truncated: bool = False) -> tuple[int, int]:
        """Record a page's text once: (pages done, pages total); done is negative when it was dropped."""
        done, total = self._finish_page(keys=[*self._k(job_id), inflight[0]],
                                        args=[page, text, now_rfc3339(), model_id, model_revision, self.ttl,
                                              inflight[1], int(truncated)])
        return int(done), int(total)

    def fail(self, job_id: str, code: str, message: str) -> str:
        """'failed' when this call ended the job; 'was_<status>' when it had already ended; 'gone'."""
        return self._end(job_id, JobStatus.FAILED, code, message)

    def cancel(self, job_id: str) -> str:
        return self._end(job_id, JobStatus.CANCELLED, "", "")

    def _end(self, job_id: str, status: JobStatus, code: str, message: str) -> str:
        result = self._finish_job(keys=self._k(job_id), args=[status.value, now_rfc3339(), code, message, self.ttl])
        return result.decode()

    def delete(self, job_id: str) -> bool:
        """Cancel if needed (waking long-polls and stopping workers), then remove everything."""
        self.cancel(job_id)
        return self.discard(job_id)

    def discard(self, job_id: str) -> bool:
        """Remove the record, input, results and idempotency key, with no state change on the way."""
        idem = self.field(job_id, "idem_key")
        return bool(self.redis.delete(*self._k(job_id), *([idem] if idem else [])))

    def pages(self, job_id: str) -> list[PageResult]:
        raw = {field.decode(): value for field, value in self.redis.hgetall(_keys(job_id)["pages"]).items()}
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
            pubsub.subscribe(_keys(job_id)["events"])
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
