"""How full Redis is, and whether it may throw our keys away.

Accepted work must always be able to finish: its records, results, acknowledgements and the workers'
own bookkeeping are written after the submission, so new submissions are refused (503 + Retry-After)
once Redis is past GNOSIS_REDIS_MEMORY_LIMIT of its `maxmemory`, well before Redis itself refuses
writes. And Redis must never evict: an evicted lease, worker record, job record or result is work
silently lost, so any `maxmemory-policy` but `noeviction` is named loudly at start-up and in /readyz.
So is a Redis that writes no AOF: its next restart loses what was accepted since its last snapshot.
Read from `INFO`, which managed Redis (Memorystore, ElastiCache) answers where CONFIG is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

READ_EVERY = 1.0
"""Seconds a process trusts its last reading of Redis's memory."""


@dataclass(frozen=True)
class Memory:
    used: int
    limit: int  # maxmemory; 0 = no limit
    policy: str
    aof: bool | None = None
    """Whether Redis appends every write to its AOF; None where not read (the gauge's once-a-second read)."""

    @property
    def evicting(self) -> bool:
        return self.policy != "noeviction"

    def fraction(self) -> float:
        return self.used / self.limit if self.limit else 0.0

    def eviction_warning(self) -> str | None:
        if not self.evicting:
            return None
        return (f"Redis maxmemory-policy is {self.policy}: it may evict leases, worker records, jobs and results "
                "(work lost without a trace). Set it to noeviction.")

    def persistence_warning(self) -> str | None:
        if self.aof is not False:
            return None
        return ("Redis writes no AOF (appendonly no): a restart loses every job accepted since its last snapshot, "
                "or all of them if it keeps none. Set appendonly yes (docs/operations.md, Persistence).")

    def warning(self) -> str | None:
        found = [w for w in (self.eviction_warning(), self.persistence_warning()) if w]
        return " ".join(found) or None

    def describe(self) -> dict:
        out = {"used_memory": self.used, "maxmemory": self.limit, "maxmemory_policy": self.policy}
        if self.aof is not None:
            out["aof_enabled"] = self.aof
        if self.warning():
            out["warning"] = self.warning()
        return out


def read(client: redis.Redis, *, persistence: bool = False) -> Memory:
    """Redis's memory settings; with `persistence`, whether it writes an AOF too (a second round trip:
    INFO with two sections needs Redis 7)."""
    info = client.info("memory")
    aof = bool(int(client.info("persistence").get("aof_enabled", 0))) if persistence else None
    return Memory(used=int(info.get("used_memory", 0)), limit=int(info.get("maxmemory", 0)),
                  policy=str(info.get("maxmemory_policy", "noeviction")), aof=aof)


def warn_if_unsafe(client: redis.Redis, who: str) -> Memory | None:
    """At start-up: the loud lines an operator must see, if Redis may evict or keeps no AOF. None when
    Redis does not answer yet."""
    try:
        memory = read(client, persistence=True)
    except redis.RedisError as exc:
        log.warning("%s: could not read Redis's memory settings yet: %s", who, exc)
        return None
    if memory.evicting:
        log.error("%s: %s", who, memory.eviction_warning())
    if memory.persistence_warning():
        log.warning("%s: %s", who, memory.persistence_warning())
    return memory


class MemoryGauge:
    """`read`, at most every READ_EVERY seconds per process: one round trip a second, not per request.
    Between reads the process adds what it wrote itself (`note`), so a burst of submissions inside one
    second cannot run past the bound on a stale reading."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._last: tuple[float, Memory] | None = None
        self._added = 0
        self._lock = threading.Lock()

    def current(self) -> Memory:
        now = time.monotonic()
        last = self._last
        if last is None or now - last[0] > READ_EVERY:
            memory = read(self.client)
            with self._lock:
                self._last, self._added = (now, memory), 0
            return memory
        with self._lock:
            added = self._added
        return Memory(used=last[1].used + added, limit=last[1].limit, policy=last[1].policy)

    def note(self, size: int) -> None:
        with self._lock:
            self._added += size
