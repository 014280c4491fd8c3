"""Idempotency-Key: the same key with the same request returns the first job (or batch); with another
request, 409.

The key is claimed with SET NX before the job exists, so two identical requests racing each other still
create one job. A job's key lives as long as its job; a batch's for GNOSIS_JOB_TTL from its submission.
If the request that claimed it died before writing its job, a retry waits a few seconds for the record,
then takes the key over. A retry is answered with the job only once the job is accepted for good: it
confirms on its own (GNOSIS_ACCEPT_REPLICAS), then vouches for the job, after which the first request,
should its own sending or confirming fail, can no longer remove it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis

from .. import backoff
from ..defaults import DEFAULT_IDEMPOTENCY_WAIT
from ..errors import BadRequest, Conflict

T = TypeVar("T")

_MAX_KEY = 200


def validate(key: str) -> str:
    if not 0 < len(key) <= _MAX_KEY or not key.isprintable():
        raise BadRequest(f"Idempotency-Key must be 1 to {_MAX_KEY} printable characters.",
                         code="invalid_idempotency_key")
    return key


def claim(client: redis.Redis, name: str, *, job_id: str, document_sha: str, ttl: int) -> str | None:
    """None when this request now owns the key; otherwise the id of the job that owns it."""
    for _ in range(2):  # the stored key may expire between SET NX and GET
        if client.set(name, f"{job_id}:{document_sha}", nx=True, ex=ttl):
            return None
        stored = client.get(name)
        if stored is None:
            continue
        first_job, first_sha = stored.decode().split(":", 1)
        if first_sha != document_sha:
            raise Conflict("This Idempotency-Key was already used with a different request.",
                           code="idempotency_key_reused")
        return first_job
    return None


# KEYS: idempotency key. ARGV: the stale value, the new value, ttl. 1 when this call took the key over.
_TAKE_OVER = """
local value = redis.call('GET', KEYS[1])
if value and value ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


def take_over(client: redis.Redis, name: str, *, stale_job: str, job_id: str, document_sha: str,
              ttl: int) -> str | None:
    """Claim a key whose first request never created its job. None when this request now owns it;
    otherwise the id of the job of whichever request took it over first."""
    taken = client.eval(_TAKE_OVER, 1, name, f"{stale_job}:{document_sha}", f"{job_id}:{document_sha}", ttl)
    if taken:
        return None
    stored = client.get(name)
    return stored.decode().split(":", 1)[0] if stored else None


def take_key(client: redis.Redis, name: str, *, new_id: str, fingerprint: str, ttl: int,
             replay: Callable[[str], T | None]) -> T | None:
    """None when this request now holds the key (and makes `new_id`); otherwise `replay`'s answer for the
    request that holds it. A holder that never wrote its record (its process died) is taken over."""
    first = claim(client, name, job_id=new_id, document_sha=fingerprint, ttl=ttl)
    if first is None:
        return None
    answer = replay(first)
    if answer is not None:
        return answer
    first = take_over(client, name, stale_job=first, job_id=new_id, document_sha=fingerprint, ttl=ttl)
    if first is None:
        return None
    return replay(first) or still_in_use()


def replay(fetch: Callable[[], T | None], *, confirm: Callable[[], None], vouch: Callable[[], bool]) -> T | None:
    """The first request's record once it exists, confirmed on the replicas and vouched for; None if it
    never appeared, or if the first request abandoned it first (either way the key may be taken over)."""
    found = wait_for_record(fetch, timeout=DEFAULT_IDEMPOTENCY_WAIT)
    if found is None:
        return None
    confirm()  # Unavailable (503 redis_unreplicated) when the replicas fall short: nothing is removed
    return found if vouch() else None


def still_in_use():
    raise Conflict("A request with this Idempotency-Key is still being processed; retry shortly.",
                   code="idempotency_key_in_use")


def wait_for_record(fetch, *, timeout: float):
    """The first request may still be writing its job: give it a moment rather than answer 404.

    Returns what `fetch` returned once it was not None, or None after `timeout` seconds.
    """
    # A few milliseconds in practice; no event exists for "record written".
    return backoff.poll(fetch, timeout=timeout, first=0.01, cap=0.2)


# KEYS: idempotency key. ARGV: this request's claim. Deletes the key only while it holds that claim.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def release(client: redis.Redis, name: str, claim_value: str) -> None:
    """Give the key up after a failed submission, unless another request holds it by now."""
    client.eval(_RELEASE, 1, name, claim_value)


def claim_value(job_id: str, document_sha: str) -> str:
    return f"{job_id}:{document_sha}"


def holder(client: redis.Redis, name: str) -> str | None:
    stored = client.get(name)
    return stored.decode().split(":", 1)[0] if stored else None
