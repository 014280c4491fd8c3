"""A circuit breaker per bucket, per process: while a bucket fails for now, one thread at a time calls it.

A GPU worker runs a page per thread, up to 64 and more. Without this, every one of them would spend
GNOSIS_BUCKET_TIMEOUT in the storage client's retries on each page of a failing bucket, one after the
other, while the GPU idles and uploads wait behind them. With it, one call (the probe) finds out
whether the bucket answers again, and the others give their page back, or leave their result owed, at
once. Per process, not shared through Redis: what a bucket answers can differ from host to host.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class Open(Exception):
    """The bucket failed for now and another thread is finding out whether it answers again."""


class Breaker:
    """Keys (bucket names) that failed a call for now. A failing key lets one caller through at a time
    (the probe), and none sooner than `rest` seconds after its last failure; the others are refused."""

    def __init__(self, transient: Callable[[BaseException], bool], *, rest: float = 0.0) -> None:
        self._transient = transient
        self.rest = rest
        """Seconds after a failure before the next probe: 0 for reads (a page waits on it), the
        housekeeper's period for writes (a result can be left owed to it)."""
        self._lock = threading.Lock()
        self._failing: dict[str, float] = {}
        """Key: when (time.monotonic) it may be probed again."""
        self._probing: dict[str, float] = {}
        """Key: when its probe's claim lapses, should the probing thread be lost without a word."""

    def failing(self, key: str) -> bool:
        with self._lock:
            return key in self._failing

    def refusing(self, key: str) -> bool:
        """Whether a call to `key` would be refused now: for a caller with work to do before the call
        (reading what it would write) that it can skip. The call itself still decides."""
        with self._lock:
            return self._refused(key, time.monotonic())

    @contextlib.contextmanager
    def call(self, key: str, *, hold: float, force: bool = False) -> Iterator[None]:
        """Run the block as a call to `key`, or raise Open. `hold` bounds how long one probe keeps the
        others out; `force` (the housekeeper, whose retries are spaced already) never waits for a probe.
        A transient error out of the block marks the key failing; a value, or an error the bucket
        answered with (a 403, a 404), clears it."""
        probe = False if force else self._enter(key, hold)
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, Exception) and self._transient(exc):
                self._failed(key, probe)
            elif isinstance(exc, Exception):
                self._answered(key)
            elif probe:  # interrupted (a time limit, a shutdown): nothing was learnt of the bucket
                with self._lock:
                    self._probing.pop(key, None)
            raise
        self._answered(key)

    def _enter(self, key: str, hold: float) -> bool:
        """Whether this call is the failing key's probe; raises Open while another one is."""
        now = time.monotonic()
        with self._lock:
            if key not in self._failing:
                return False
            if self._refused(key, now):
                raise Open(key)
            self._probing[key] = now + hold
            return True

    def _refused(self, key: str, now: float) -> bool:
        again = self._failing.get(key)
        return again is not None and (now < again or now < self._probing.get(key, 0.0))

    def _failed(self, key: str, probe: bool) -> None:
        with self._lock:
            self._failing[key] = time.monotonic() + self.rest
            if probe:  # a call begun before the key failed leaves the probe's claim alone
                self._probing.pop(key, None)

    def _answered(self, key: str) -> None:
        with self._lock:
            self._failing.pop(key, None)
            self._probing.pop(key, None)
