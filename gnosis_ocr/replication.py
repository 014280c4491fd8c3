"""A 202 that outlives a failover: acceptance confirmed by Redis replicas (GNOSIS_ACCEPT_REPLICAS).

Redis replicates asynchronously. A job written to the primary and answered 202 is gone with that
primary if no replica had it yet: after the failover its id is 404, and the client that was told
"accepted" has nothing to poll and no reason to resubmit. So the API can answer 202 only once replicas
have acknowledged every write made so far (Redis's WAIT). When they do not within
GNOSIS_ACCEPT_REPLICAS_WAIT, the job or batch is removed and the client gets 503 `redis_unreplicated`
+ Retry-After: nothing was accepted, so a retry is safe. Two policies:

- `connected`: every replica connected at that moment, and the primary alone while none is. A single
  failure loses nothing accepted, and after a failover (or a Memorystore maintenance) the new primary,
  whose replica is still being rebuilt, goes on accepting.
- a number N: exactly that many, or refuse. Also safe when the primary is cut off from its replicas
  but not from the API (the writes a promoted replica never sees), at the price of refusing every
  submission while fewer than N replicas are up.

A graceful Sentinel failover (SENTINEL FAILOVER, as for maintenance) promotes the replica while the old
primary, not yet told, goes on taking writes for up to ten seconds, then resynchronises from the new
one and drops them. The old primary has no replica then, so `connected` would accept on it alone: 34 of
110 jobs answered 202 in such a failover were 404 afterwards. So under `connected`, with a Sentinel
REDIS_URL, a primary with no replica is trusted only if every sentinel that answers names it (by run
id) and none has a failover under way; otherwise the submission is refused and the pool reconnects,
asking the sentinels again.

WAIT counts only the writes of the connection it is sent on, and a pooled connection may have written
nothing since it connected, when WAIT answers at once that every replica is in sync. So a PUBLISH goes
first on the same connection: it is replicated, writes no key, is allowed while Redis is full, and its
offset in the replication stream lies past every write any connection made before it, the job's record
and its pages' messages included.
"""

from __future__ import annotations

import logging
import time

import redis

from .errors import Unavailable

log = logging.getLogger(__name__)

CHANNEL = "gnosis:accepted"
"""What the marker PUBLISH is sent to: nobody listens; it only moves the connection's offset."""

CODE = "redis_unreplicated"

CONNECTED = "connected"

READ_EVERY = 1.0
"""Seconds a process trusts its last count of connected replicas (`connected` policy)."""


def parse(policy: str) -> int | None:
    """The replicas a policy names: N, or None for `connected`. ValueError for anything else."""
    if policy == CONNECTED:
        return None
    count = int(policy)
    if count < 0:
        raise ValueError(policy)
    return count


def confirm(client: redis.Redis, replicas: int, timeout: float) -> int:
    """How many replicas hold every write Redis took before this call, waiting at most `timeout` seconds
    for `replicas` of them."""
    pipe = client.pipeline(transaction=False)  # one connection for both commands
    pipe.publish(CHANNEL, "")
    pipe.execute_command("WAIT", replicas, max(1, round(timeout * 1000)))
    return int(pipe.execute()[-1])


class SentinelCheck:
    """Whether the node a client writes to is the primary every reachable sentinel names, with no
    failover under way: None if so, else why not. Sentinels that do not answer say nothing."""

    def __init__(self, client: redis.Redis, master: str, sentinels: list[redis.Redis]) -> None:
        self.client = client
        self.master = master
        self.sentinels = sentinels

    def __call__(self) -> str | None:
        ours = self.client.info("server")["run_id"]
        for sentinel in self.sentinels:
            try:
                state = sentinel.execute_command("SENTINEL", "MASTER", self.master)
            except redis.RedisError:
                continue
            if isinstance(state, list):  # RESP2 without redis-py's parsing: a flat list of pairs
                state = dict(zip(state[::2], state[1::2]))
            state = {_text(k): _text(v) for k, v in state.items()}
            if state.get("runid") != ours:
                return "the sentinels name another primary"
            if "failover_in_progress" in state.get("flags", ""):
                return "a failover is under way"
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def connected(client: redis.Redis) -> int:
    """Replicas connected to the primary now (`INFO replication`)."""
    return int(client.info("replication").get("connected_slaves", 0))


def node_id(client: redis.Redis) -> str | None:
    """The replication id of the node `client` reaches: a replica promoted to primary takes a new one, and so
    does a Redis restarted without its data. None where INFO is refused (some managed proxies): then only a
    gap in the beats tells a failover."""
    try:
        return client.info("replication").get("master_replid")
    except redis.ResponseError:
        return None


class Acceptance:
    """One process's acceptance policy: `require` before each 202."""

    def __init__(self, client: redis.Redis, policy: str, timeout: float,
                 primary_check: SentinelCheck | None = None) -> None:
        self.client = client
        self.policy = policy
        self.replicas = parse(policy)
        self.timeout = timeout
        self.primary_check = primary_check  # Sentinel only: is a primary with no replica still the primary?
        self._count: tuple[float, int] | None = None  # (when read, replicas): one tuple, replaced whole

    @property
    def enabled(self) -> bool:
        return self.replicas != 0

    def wanted(self) -> int:
        """Replicas the next submission waits for."""
        if self.replicas is not None:
            return self.replicas
        now = time.monotonic()
        last = self._count
        if last is not None and now - last[0] <= READ_EVERY:
            return last[1]
        count = connected(self.client)
        if last is not None and (last[1] > 0) != (count > 0):
            log.warning("Redis has %d replica(s) connected: %s", count,
                        "submissions wait for them again" if count else "accepting on the primary alone")
        self._count = (now, count)
        return count

    def require(self, *, what: str, change: bool = False) -> None:
        """Raise Unavailable (`redis_unreplicated`) unless the replicas the policy wants hold every write so
        far; a no-op when it wants none. `change`: what is unconfirmed is a change to something accepted (a
        cancel, a deletion), which stays on the primary: the answer asks for it again rather than saying
        nothing was kept."""
        if not self.enabled:
            return
        then = ("it is on the primary alone, where a failover could undo it. Send it again: repeating it is safe."
                if change else "nothing was accepted. Retry later.")
        try:
            wanted = self.wanted()
            confirmed = confirm(self.client, wanted, self.timeout) if wanted > 0 else 0
            stale = self.primary_check() if wanted == 0 and self.primary_check is not None else None
        except redis.ResponseError as exc:  # a replica as REDIS_URL, or a Redis that refuses WAIT or INFO
            raise Unavailable(f"Redis cannot confirm writes on replicas ({exc}); {then}", code=CODE) from exc
        if stale is not None:
            self._count = None
            self.client.connection_pool.disconnect()  # the next connection asks the sentinels again
            raise Unavailable(f"Redis is failing over ({stale}); {then}", code=CODE)
        if confirmed < wanted:
            raise Unavailable(f"Redis confirmed the {what.replace('_', ' ')} on {confirmed} of {wanted} replica(s) "
                              f"within {self.timeout:g}s; {then}", code=CODE)

    def describe(self) -> dict:
        """For /readyz: what acceptance requires and what Redis has, with a warning while it falls short."""
        have = connected(self.client)
        out: dict = {"accept_replicas": self.policy, "connected_replicas": have}
        if self.replicas is not None and have < self.replicas:
            out["warning"] = (f"GNOSIS_ACCEPT_REPLICAS is {self.replicas} but Redis has {have} replica(s) connected: "
                              "every submission is refused with 503 redis_unreplicated.")
        elif self.replicas is None and have == 0:
            out["warning"] = ("Redis has no replica connected: submissions are accepted on the primary alone, and "
                              "a failover now would lose the latest of them.")
        return out

    def warn_if_short(self, who: str) -> None:
        """At start-up: one loud line if submissions would be refused or unconfirmed. Silent when Redis is
        not up yet."""
        if not self.enabled:
            return
        try:
            warning = self.describe().get("warning")
        except redis.RedisError as exc:
            log.warning("%s: could not read Redis's replicas yet: %s", who, exc)
            return
        if warning:
            log.error("%s: %s", who, warning)
        else:
            log.info("%s: a submission is accepted once Redis replicas confirm it (GNOSIS_ACCEPT_REPLICAS=%s)", who,
                     self.policy)
