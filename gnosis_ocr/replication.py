"""A 202 that outlives a failover: acceptance confirmed by Redis replicas (GNOSIS_ACCEPT_REPLICAS).

Redis replicates asynchronously. A job written to the primary and answered 202 is gone with that
primary if no replica had it yet: after the failover its id is 404, and the client that was told
"accepted" has nothing to poll and no reason to resubmit. With GNOSIS_ACCEPT_REPLICAS=N the API
answers 202 only once N replicas have acknowledged every write made so far (Redis's WAIT). When they
do not within GNOSIS_ACCEPT_REPLICAS_WAIT, the job or batch is removed and the client gets 503
`redis_unreplicated` + Retry-After: nothing was accepted, so a retry is safe.

WAIT counts only the writes of the connection it is sent on, and a pooled connection may have written
nothing, when WAIT answers at once that every replica is in sync. So a PUBLISH goes first on the same
connection: it is replicated, writes no key, is allowed while Redis is full, and its offset in the
replication stream lies past every write any connection made before it, the job's record and its
pages' messages included.
"""

from __future__ import annotations

import logging

import redis

from .errors import Unavailable

log = logging.getLogger(__name__)

CHANNEL = "gnosis:accepted"
"""What the marker PUBLISH is sent to: nobody listens; it only moves the connection's offset."""

CODE = "redis_unreplicated"


def confirm(client: redis.Redis, replicas: int, timeout: float) -> int:
    """How many replicas hold every write Redis took before this call, waiting at most `timeout` seconds
    for `replicas` of them."""
    pipe = client.pipeline(transaction=False)  # one connection for both commands
    pipe.publish(CHANNEL, "")
    pipe.execute_command("WAIT", replicas, max(1, round(timeout * 1000)))
    return int(pipe.execute()[-1])


def require(client: redis.Redis, replicas: int, timeout: float, *, what: str) -> None:
    """Raise Unavailable (`redis_unreplicated`) unless `replicas` replicas confirm every write so far; a no-op for 0."""
    if replicas <= 0:
        return
    try:
        confirmed = confirm(client, replicas, timeout)
    except redis.ResponseError as exc:  # a replica as REDIS_URL, or a Redis that refuses WAIT
        raise Unavailable(f"Redis cannot confirm writes on replicas ({exc}); nothing was accepted. "
                          "Retry later.", code=CODE) from exc
    if confirmed < replicas:
        raise Unavailable(f"Redis confirmed the {what} on {confirmed} of {replicas} replica(s) within {timeout:g}s; "
                          "nothing was accepted. Retry later.", code=CODE)


def connected(client: redis.Redis) -> int:
    """Replicas connected to the primary now (`INFO replication`)."""
    return int(client.info("replication").get("connected_slaves", 0))


def describe(client: redis.Redis, replicas: int) -> dict:
    """For /readyz: what acceptance requires and what Redis has, with a warning while it falls short."""
    have = connected(client)
    out: dict = {"accept_replicas": replicas, "connected_replicas": have}
    if have < replicas:
        out["warning"] = (f"GNOSIS_ACCEPT_REPLICAS is {replicas} but Redis has {have} replica(s) connected: "
                          "every submission is refused with 503 redis_unreplicated.")
    return out


def warn_if_short(client: redis.Redis, replicas: int, who: str) -> None:
    """At start-up: one loud line if submissions would all be refused. Silent when Redis is not up yet."""
    if replicas <= 0:
        return
    try:
        warning = describe(client, replicas).get("warning")
    except redis.RedisError as exc:
        log.warning("%s: could not read Redis's replicas yet: %s", who, exc)
        return
    if warning:
        log.error("%s: %s", who, warning)
    else:
        log.info("%s: a job is accepted once %d replica(s) confirm it (GNOSIS_ACCEPT_REPLICAS)", who, replicas)
