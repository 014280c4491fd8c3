"""Batches: one job per document under a bucket prefix, results written to another prefix.

A batch is a Redis hash with its counters; its documents' jobs carry its id. The API only writes the
record and hands the listing to a light worker (`gnosis.expand_batch`), which makes the jobs; the page
workers read each document from the bucket themselves; whoever ends a batch's job writes its result
to the destination and counts it here (END_DOCUMENT, atomic), and the count that completes a listed
batch makes it final. Failed documents are kept in a list, paged by the API.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass

import redis

from . import keys
from .job import ClaimLost, JobStatus, now_rfc3339

# Counts one document. Returns the batch's status after the count ('' when the batch is gone) and 1 if
# this call counted it: a job counted before (by its worker, or by the housekeeper after that worker
# died), or a document counted by an earlier run of the listing, is not counted again (0).
_END_DOCUMENT = """
local record, failed, batch_ends, made, jobs = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
-- done|failed|skipped, the failure's JSON or '', now, '1' for a document that never became a job
-- (failed or skipped while listing: not yet in the total), its job id ('' for those), its name
local outcome, failure, now, listing, job_id, name = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local st = redis.call('HGET', record, 'status')
if not st then return {'', 0} end
if job_id ~= '' and redis.call('ZREM', batch_ends, job_id) == 0 then return {st, 0} end
-- A job its listing made but never added (the listing failed in between, and made another): not the
-- batch's, so not in its total, and not counted either.
if job_id ~= '' and redis.call('SISMEMBER', jobs, job_id) == 0 then return {st, 0} end
if listing == '1' and redis.call('SADD', made, name) == 0 then return {st, 0} end  -- a listing run again
if listing == '1' then redis.call('HINCRBY', record, 'documents_total', 1) end
if outcome == 'failed' then
  redis.call('HINCRBY', record, 'documents_failed', 1)
  redis.call('RPUSH', failed, failure)
elseif outcome == 'skipped' then
  redis.call('HINCRBY', record, 'documents_skipped', 1)
else
  redis.call('HINCRBY', record, 'documents_done', 1)
end
return {redis.call('HGET', record, 'status'), 1}
"""

# A listed batch whose every job has ended becomes final. Returns the status, 'final:succeeded' for the
# call that made it so.
_SETTLE = """
local record, outbox = KEYS[1], KEYS[2]
local now = ARGV[1]
local st = redis.call('HGET', record, 'status')
if not st then return '' end
if st ~= 'queued' and st ~= 'running' then return st end
if redis.call('HGET', record, 'listed') ~= '1' then return st end
local ended = tonumber(redis.call('HGET', record, 'documents_done') or '0') +
              tonumber(redis.call('HGET', record, 'documents_failed') or '0') +
              tonumber(redis.call('HGET', record, 'documents_skipped') or '0')
if ended < tonumber(redis.call('HGET', record, 'documents_total') or '0') then return st end
redis.call('HSET', record, 'status', 'succeeded', 'finished_at', now)
local callback = redis.call('HGET', record, 'callback_url')
if callback and callback ~= '' then  -- owed from this very transition (worker/outbox.py)
  redis.call('ZADD', outbox, 'NX', tonumber(redis.call('TIME')[1]), redis.call('HGET', record, 'id'))
end
return 'final:succeeded'
"""


# A listing that saw ARGV[1] documents marks its live batch listed. 0, marking nothing, when fewer than that
# are made on this node: a failover lost what the listing made on the old primary, and the listing runs
# again. Marked listed all the same, the batch ended once the documents made here had, short of the rest.
# KEYS: record, unlisted index, made set. ARGV: documents seen, the batch's id.
_LISTED = """
local record, unlisted, made = KEYS[1], KEYS[2], KEYS[3]
local st = redis.call('HGET', record, 'status')
if st ~= 'queued' and st ~= 'running' then return 1 end
if redis.call('SCARD', made) < tonumber(ARGV[1]) then return 0 end
redis.call('HSET', record, 'listed', '1')
redis.call('ZREM', unlisted, ARGV[2])
return 1
"""


# A new batch, with its entry in the unlisted index. KEYS: record, unlisted index, Idempotency-Key claim
# (or ''). ARGV: the claim this request holds, now (unix s), then field/value pairs. 0, writing nothing,
# when a retry took the key over while this request was slow: one key, one batch.
_CREATE = """
if KEYS[3] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], redis.call('HGET', KEYS[1], 'id'))
return 1
"""

# Removes a batch that never started, and its key. ARGV[1] '1': unless a retry with its Idempotency-Key
# has answered with it (`vouched`), when nothing is removed and 0 is returned.
_DISCARD = """
if ARGV[1] == '1' and redis.call('HGET', KEYS[1], 'vouched') == '1' then return 0 end
local idem = redis.call('HGET', KEYS[1], 'idem_key')
if idem and idem ~= '' then redis.call('DEL', idem) end
redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[1], 'id') or '')
redis.call('DEL', KEYS[1])
return 1
"""

# A field of a batch that still exists: a record deleted meanwhile is not brought back as a stub.
_NOTE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# Counts a new job in a live batch, once a document: 0 (nothing written) when the batch has ended
# meanwhile (cancelled while its listing ran), 2 when a listing made a job of this document already (two
# listings of one batch ran at once: kombu put a running listing's message back as its connection dropped).
# Either way the caller discards its job.
_ADD_JOB = """
local record, jobs, made = KEYS[1], KEYS[2], KEYS[3]
local job_id, name = ARGV[1], ARGV[2]
local st = redis.call('HGET', record, 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
if redis.call('SADD', made, name) == 0 then return 2 end
redis.call('SADD', jobs, job_id)
redis.call('HINCRBY', record, 'documents_total', 1)
if st == 'queued' then redis.call('HSET', record, 'status', 'running') end
return 1
"""


@dataclass(frozen=True)
class Batch:
    id: str
    status: str
    source: str
    destination: str
    documents_total: int
    documents_done: int
    documents_failed: int
    documents_skipped: int
    created_at: str
    finished_at: str | None
    owner: str
    overwrite: bool
    callback_url: str | None
    options: str
    listed: bool
    marked: bool
    """Its destination's mark (worker/batches.BATCH_MARK) is written: a listing run again skips it."""
    error: dict | None

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Batch:
        return cls(id=h["id"], status=h["status"], source=h["source"], destination=h["destination"],
                   documents_total=int(h.get("documents_total", 0)), documents_done=int(h.get("documents_done", 0)),
                   documents_failed=int(h.get("documents_failed", 0)),
                   documents_skipped=int(h.get("documents_skipped", 0)), created_at=h["created_at"],
                   finished_at=h.get("finished_at") or None, owner=h.get("owner", ""),
                   overwrite=h.get("overwrite") == "1", callback_url=h.get("callback_url") or None,
                   options=h.get("options", ""), listed=h.get("listed") == "1", marked=h.get("marked") == "1",
                   error={"code": h["error_code"], "message": h.get("error_message", "")} if h.get("error_code")
                   else None)

    @property
    def final(self) -> bool:
        return JobStatus(self.status).final

    def to_api(self) -> dict:
        return {"id": self.id, "status": self.status, "source": self.source, "destination": self.destination,
                "documents_total": self.documents_total, "documents_done": self.documents_done,
                "documents_failed": self.documents_failed, "documents_skipped": self.documents_skipped,
                "created_at": self.created_at, "finished_at": self.finished_at, "error": self.error,
                "links": {"self": f"/v1/batches/{self.id}", "documents": f"/v1/batches/{self.id}/documents"}}


@dataclass(frozen=True)
class Settlement:
    """Where a batch stands after a count."""

    status: str
    """Its status ('' once the batch is gone)."""
    ended_now: bool
    """This call made it final: announcing it (its webhook) is this caller's to do."""
    counted: bool = False
    """A document's count only: this call counted it (not a repeat of one counted before)."""


class BatchStore:
    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl
        self._end = client.register_script(_END_DOCUMENT)
        self._add = client.register_script(_ADD_JOB)
        self._settle = client.register_script(_SETTLE)
        self._note = client.register_script(_NOTE)
        self._create = client.register_script(_CREATE)
        self._discard = client.register_script(_DISCARD)
        self._listed = client.register_script(_LISTED)

    def create(self, *, source: str, destination: str, owner: str, overwrite: bool, callback_url: str,
               options: str, batch_id: str | None = None, idem_name: str = "", idem_claim: str = "") -> Batch:
        """A new batch. With an Idempotency-Key claim (`idem_name`), only while the key still holds
        `idem_claim`: else ClaimLost, and nothing is written."""
        batch_id = batch_id or uuid.uuid4().hex
        record = {"id": batch_id, "status": JobStatus.QUEUED.value, "source": source, "destination": destination,
                  "owner": owner, "overwrite": "1" if overwrite else "0", "callback_url": callback_url,
                  "options": options, "created_at": now_rfc3339(), "documents_total": 0, "documents_done": 0,
                  "documents_failed": 0, "documents_skipped": 0, "listed": "0", "idem_key": idem_name}
        pairs = [str(item) for pair in record.items() for item in pair]
        if not self._create(keys=[keys.batch(batch_id), keys.BATCHES_UNLISTED, idem_name],
                            args=[idem_claim, int(self.redis.time()[0]), *pairs]):
            raise ClaimLost(f"the Idempotency-Key of batch {batch_id} was taken over before the batch was written")
        return Batch.from_hash({k: str(v) for k, v in record.items()})

    def discard(self, batch_id: str) -> None:
        """Remove a batch that never started (its listing could not be published): it never existed."""
        self._discard(keys=[keys.batch(batch_id), keys.BATCHES_UNLISTED], args=[""])

    def abandon(self, batch_id: str) -> bool:
        """`discard`, unless a retry with the batch's Idempotency-Key has answered with it (False: kept)."""
        return bool(self._discard(keys=[keys.batch(batch_id), keys.BATCHES_UNLISTED], args=["1"]))

    def vouch(self, batch_id: str) -> bool:
        """Before a retry answers with this batch; False when the first request abandoned it first."""
        return bool(self._note(keys=[keys.batch(batch_id)], args=["vouched", "1"]))

    def get(self, batch_id: str) -> Batch | None:
        h = self.redis.hgetall(keys.batch(batch_id))
        return Batch.from_hash({k.decode(): v.decode() for k, v in h.items()}) if h else None

    def add_job(self, batch_id: str, job_id: str, name: str) -> bool:
        """Count a new job of the batch, the job of document `name` (its path below the source); False,
        counting nothing, if the batch ended meanwhile or a listing made that document's job already:
        the job is not the batch's."""
        keys_ = [keys.batch(batch_id), keys.batch_jobs(batch_id), keys.batch_made(batch_id)]
        return self._add(keys=keys_, args=[job_id, name]) == 1

    def made(self, batch_id: str, name: str) -> bool:
        """Whether the listing dealt with this document (its path below the source) already."""
        return bool(self.redis.sismember(keys.batch_made(batch_id), name))

    def jobs(self, batch_id: str) -> list[str]:
        return [raw.decode() for raw in self.redis.smembers(keys.batch_jobs(batch_id))]

    def end_document(self, batch_id: str, outcome: str, *, name: str = "", code: str = "", message: str = "",
                     listing: bool = False, job_id: str = "") -> Settlement:
        """Count one document of the batch: `done`, `failed` or `skipped`; `listing` for one that never
        became a job (every object listed counts in documents_total), counted once by its `name`."""
        failure = json.dumps({"name": name, "code": code, "message": message}) if outcome == "failed" else ""
        status, counted = self._end(
            keys=[keys.batch(batch_id), keys.batch_failed(batch_id), keys.BATCH_ENDS, keys.batch_made(batch_id),
                  keys.batch_jobs(batch_id)],
            args=[outcome, failure, now_rfc3339(), "1" if listing else "0", job_id, name])
        if not status:
            return Settlement("", ended_now=False)
        return dataclasses.replace(self.settle(batch_id), counted=bool(counted))

    def listed(self, batch_id: str, documents: int) -> Settlement | None:
        """The end of a listing that saw `documents` documents: the batch marked listed, and settled. None,
        marking nothing, when fewer are made on this node (a failover lost some): the listing must run again."""
        if not self._listed(keys=[keys.batch(batch_id), keys.BATCHES_UNLISTED, keys.batch_made(batch_id)],
                            args=[documents, batch_id]):
            return None
        return self.settle(batch_id)

    def settle(self, batch_id: str) -> Settlement:
        """The batch's status, and whether this call made it final."""
        result = self._settle(keys=[keys.batch(batch_id), keys.BATCH_OUTBOX], args=[now_rfc3339()]).decode()
        status, ended_now = result.removeprefix("final:"), result.startswith("final:")
        if ended_now:
            self._expire(batch_id)
        return Settlement(status, ended_now=ended_now)

    def end(self, batch_id: str, status: str, *, code: str = "", message: str = "") -> bool:
        """Cancel or fail a live batch; False if it was already final."""
        batch = self.get(batch_id)
        if batch is None or batch.final:
            return False
        fields = {"status": status, "finished_at": now_rfc3339()}
        if code:
            fields.update(error_code=code, error_message=message)
        pipe = self.redis.pipeline()  # MULTI: the transition and the webhook it owes, together
        pipe.hset(keys.batch(batch_id), mapping=fields)
        pipe.zrem(keys.BATCHES_UNLISTED, batch_id)
        if batch.callback_url:
            pipe.zadd(keys.BATCH_OUTBOX, {batch_id: int(self.redis.time()[0])}, nx=True)
        pipe.execute()
        self._expire(batch_id)
        return True

    def note_marked(self, batch_id: str) -> None:
        self._note(keys=[keys.batch(batch_id)], args=["marked", "1"])

    def note_webhook(self, batch_id: str, status: str, attempts: int) -> None:
        self.redis.hset(keys.batch(batch_id), mapping={"webhook_status": status, "webhook_attempts": attempts})

    def _expire(self, batch_id: str) -> None:
        for key in (keys.batch(batch_id), keys.batch_failed(batch_id), keys.batch_jobs(batch_id),
                    keys.batch_made(batch_id)):
            self.redis.expire(key, self.ttl)

    def failures(self, batch_id: str, *, start: int, limit: int) -> list[dict]:
        raw = self.redis.lrange(keys.batch_failed(batch_id), start, start + limit - 1)
        return [json.loads(item) for item in raw]
