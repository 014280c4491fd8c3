"""A lease in Redis with a fencing number: one holder across all hosts, lost if not renewed.

GCS FUSE offers no cross-host locks (flock is per host), so exclusion comes from
Redis. The lease only avoids duplicate work; correctness rests on the manifest,
which describes files by their hashes and is written last.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

# KEYS: lease, fence. ARGV: token, ttl_ms. Returns the fencing number, or 0 when held by another.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. '#' .. fence, 'PX', ARGV[2])
  return fence
end
return 0
"""

# KEYS: lease. ARGV: value, ttl_ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lease, channel. ARGV: value, event.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


class Lease:
    def __init__(self, client: redis.Redis, name: str, *, ttl: float) -> None:
        self.redis = client
        self.key = self.key_of(name)
        self.fence_key = f"{name}:fence"
        self.channel = f"{name}:events"
        self.ttl_ms = int(ttl * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.fence = 0
        self.lost = threading.Event()
        self.on_lost: Callable[[], None] | None = None
        """Called from the renewal thread if the lease is lost (another holder took over)."""
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._deadline: threading.Timer | None = None  # fires when the TTL runs out unrenewed

    @staticmethod
    def key_of(name: str) -> str:
        """The key that holds lease `name` (for readers that only look at who holds it)."""
        return f"{name}:lease"

    @property
    def value(self) -> str:
        return f"{self.token}#{self.fence}"

    def acquire(self) -> bool:
        """Take the lease if it is free. Renewal starts at once: whatever the holder does next (re-hash
        gigabytes over FUSE before its download starts) may take longer than the TTL."""
        self.fence = int(self._acquire(keys=[self.key, self.fence_key], args=[self.token, self.ttl_ms]))
        if self.fence:
            self.lost.clear()
            self.on_lost = None
            self.start_heartbeat()
        return bool(self.fence)

    def renew(self) -> bool:
        return bool(self._renew(keys=[self.key], args=[self.value, self.ttl_ms]))

    def held(self) -> bool:
        """True while this process still holds the lease: the fence check before publishing."""
        return self.fence > 0 and self.redis.get(self.key) == self.value.encode()

    def holder(self) -> str | None:
        value = self.redis.get(self.key)
        return value.decode() if value else None

    def release(self, event: str = "released") -> None:
        self.stop_heartbeat()
        if self.fence:
            try:
                self._release(keys=[self.key, self.channel], args=[self.value, event])
            except redis.RedisError as exc:
                log.warning("lease %s not released (it will expire): %s", self.key, exc)
        self.fence = 0

    def start_heartbeat(self) -> None:
        """Renew every third of the TTL from a thread; on failure set `lost` and call `on_lost`."""
        self.stop_heartbeat()
        self._stop.clear()

        def expired() -> None:
            # The TTL has run out since the last renewal (Redis unreachable, or a renewal call stuck in
            # its client's retries): Redis may have handed the lease on by now, so this holder stops
            # writing (its fetch process is killed) whatever Redis says when it answers again.
            log.error("lease %s not renewed for its whole TTL; giving it up", self.key)
            give_up()

        def give_up() -> None:
            with lock:
                if self.lost.is_set() or self._stop.is_set():
                    return
                self.lost.set()
            log.error("lease %s lost (fence %d)", self.key, self.fence)
            if self.on_lost:
                self.on_lost()

        def arm() -> threading.Timer:
            # A little early: Redis counts its TTL from before the renewal's reply reached this process.
            timer = threading.Timer(0.9 * self.ttl_ms / 1000, expired)
            timer.daemon = True
            timer.start()
            return timer

        def beat() -> None:
            interval = self.ttl_ms / 3000
            # This thread's own reference: `stop_heartbeat`, on another thread, sets the shared one to None
            # (a renewal in flight then raised AttributeError here, in CI).
            deadline = self._deadline = arm()
            try:
                while not self._stop.wait(interval):
                    try:
                        ok = self.renew()
                    except redis.RedisError as exc:
                        log.warning("lease renewal failed: %s", exc)
                        continue  # unreachable is not lost until the deadline above fires
                    if not ok:
                        give_up()
                    if self.lost.is_set():
                        return
                    deadline.cancel()
                    deadline = self._deadline = arm()
            finally:
                deadline.cancel()  # the newest: one armed after `stop_heartbeat` cancelled would fire late

        lock = threading.Lock()
        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def wait_for_change(self, timeout: float) -> str | None:
        """Block until the holder publishes an event or `timeout` passes; returns the event, if any."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
            if self.holder() is None:
                return "free"
            deadline = time.monotonic() + timeout
            # get_message can return None early (on the subscribe confirmation), hence the loop.
            while (remaining := deadline - time.monotonic()) > 0:
                message = pubsub.get_message(timeout=remaining)
                if message is not None:
                    return message["data"].decode()
            return None
        finally:
            pubsub.close()
