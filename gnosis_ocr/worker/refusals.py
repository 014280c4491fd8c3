"""kombu's Redis bookkeeping that lives through a Redis refusing writes, instead of stopping the worker.

A consuming worker writes to Redis outside any task: it records each message it takes as unacknowledged,
removes it when the page is done, and restores old ones under a mutex. kombu's Redis transport lets a
refusal of any of these writes escape into Celery's event loop, which calls it an "Unrecoverable error"
and stops the worker. Under `noeviction` Redis refuses them whenever it is full, and it refuses *every*
command queued in a MULTI, even the ZREM and HDEL of an acknowledgement that would free memory: one
page finishing during an out-of-memory episode stopped its worker (three of three in a soak's 30 s
episode), and a supervisor restarted them all at once.

So, in the worker only (`install`, from the Celery app module):
- an acknowledgement is sent without MULTI (HDEL, then ZREM, in one round trip), which Redis takes
  while full. Order, not a transaction, keeps it safe: an index entry whose message is gone is dropped
  by kombu's own restore, never redelivered;
- taking a message and requeueing one wait while Redis refuses them for memory or MISCONF (a failed
  save), and go on when it takes writes again. The event loop waits with them, so the worker takes no
  more messages meanwhile (it could not record them). A line is logged at once and every minute; a
  warm or cold shutdown stops the waiting;
- the periodic restore of old unacknowledged messages is skipped while refused: the next sweep does it;
- declaring and binding queues, which Celery does again on every reconnect, count messages outside MULTI
  (kombu's MULTI of LLENs is refused whole by a full Redis) and wait while the binding's write is refused:
  a connection dropped during an episode stopped the worker, and its light worker, on the reconnect;
- a message whose acknowledgement or requeue Redis refused holds no prefetch slot any more (it stalled a
  worker of one pool process for good) but stays where kombu restores it from;
- a READONLY reply means the node this connection reached is a replica now (a graceful failover): no
  wait there ends it, so it is raised as a lost connection, and Celery reconnects (through Sentinel, to
  the new primary) as it does when a primary dies. So is the UNBLOCKED reply that Redis 7 gives a BRPOP
  blocked on a primary as it is demoted by REPLICAOF alone (an operator, a Kubernetes Redis operator;
  Sentinel also drops the clients): kombu calls both channel errors, which stopped the worker.
"""

from __future__ import annotations

import logging
import numbers
import time
from contextlib import contextmanager

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from .. import defaults
from . import loopwatch

log = logging.getLogger(__name__)

SAY_EVERY = 60.0
"""Seconds between log lines while the wait goes on."""


def refused(exc: BaseException, *, replica_waits: bool = False) -> bool:
    """A write refused for a state this Redis leaves by itself: out of memory, or a failed save (and, with
    `replica_waits`, a replica's READONLY)."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    if replica_waits and isinstance(exc, redis.exceptions.ReadOnlyError):
        return True
    return isinstance(exc, redis.ResponseError) and "MISCONF" in str(exc)


def _as_a_replica(exc: redis.ResponseError) -> bool:
    """The node answered as a replica: READONLY to a write, UNBLOCKED to a BRPOP it held as a primary."""
    return isinstance(exc, redis.exceptions.ReadOnlyError) or str(exc).startswith("UNBLOCKED")


@contextmanager
def _replica_is_a_lost_connection():
    try:
        yield
    except redis.ResponseError as exc:
        if not _as_a_replica(exc):
            raise
        raise redis.exceptions.ConnectionError(f"Redis answered as a replica ({exc}); reconnecting") from exc


def until_written(what: str, call, *args, replica_waits: bool = False, **kwargs):
    """`call(*args, **kwargs)`, tried again while Redis refuses it (see the module's text), with a pause
    that doubles up to WRITE_WAIT_MAX; `what` names the waiting in the log."""
    pause, started, said = 0.1, 0.0, 0.0
    while True:
        try:
            result = call(*args, **kwargs)
        except redis.ResponseError as exc:
            if not refused(exc, replica_waits=replica_waits) or loopwatch.stopping():
                raise
            now = time.monotonic()
            if not started:
                started = now
            if now - said >= SAY_EVERY:
                said = now
                log.warning("Redis refuses writes (%s): waiting for room before %s (%.0fs so far)", exc, what,
                            now - started)
            loopwatch.turned()  # a wait on purpose, not a stalled loop
            time.sleep(pause)  # waiting for Redis to have room again; nothing to wake on
            pause = min(pause * 2, defaults.WRITE_WAIT_MAX)
            continue
        if started:
            log.warning("Redis takes writes again after %.1fs: %s goes on", time.monotonic() - started, what)
        return result


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, riding out write refusals."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unsettled: set = set()
        """Tags whose acknowledgement or requeue Redis refused. kombu kept such a message among those this
        channel holds, so it held a prefetch slot for good: a worker of one pool process (one message at a
        time) whose ack met a demoted primary took nothing more, while its loop turned and its heartbeat
        said it was alive. Now it holds no slot, and stays where kombu restores from: the channel's close
        (a reconnect, a shutdown) puts it back in the queue, or else the visibility timeout does, from
        Redis's unacknowledged ones (a page already recorded then ends at once)."""

    def can_consume(self):
        return not self.prefetch_count or self._holding() < self.prefetch_count

    def can_consume_max_estimate(self):
        if self.prefetch_count:
            return max(self.prefetch_count - self._holding(), 0)

    def _holding(self) -> int:
        """Messages that hold a prefetch slot: kombu's count (taken, not yet acknowledged), less the
        unsettled ones still held."""
        self._unsettled &= self._delivered.keys()
        return len(self._delivered) - len(self._dirty) - len(self._unsettled)

    def append(self, message, delivery_tag):
        with _replica_is_a_lost_connection():
            until_written("recording a message as taken", super().append, message, delivery_tag)

    def ack(self, delivery_tag):
        with self._settling(delivery_tag), _replica_is_a_lost_connection(), \
                self.channel.conn_or_acquire() as client:
            client.pipeline(transaction=False).hdel(self.unacked_key, delivery_tag) \
                .zrem(self.unacked_index_key, delivery_tag).execute()
        virtual.QoS.ack(self, delivery_tag)  # kombu's own bookkeeping in this process

    def reject(self, delivery_tag, requeue=False):
        if not requeue:
            self.ack(delivery_tag)
            return
        with self._settling(delivery_tag), _replica_is_a_lost_connection():
            until_written("requeueing a message", self.restore_by_tag, delivery_tag, leftmost=True)
        virtual.QoS.ack(self, delivery_tag)

    @contextmanager
    def _settling(self, delivery_tag):
        try:
            yield
        except Exception:
            self._unsettled.add(delivery_tag)
            raise

    def restore_visible(self, start=0, num=10, interval=10):
        try:
            with _replica_is_a_lost_connection():
                super().restore_visible(start, num, interval)
        except redis.ResponseError as exc:  # a periodic sweep: the next one does what this one could not
            if not refused(exc):
                raise
            log.debug("restoring unacknowledged messages skipped: Redis refuses writes (%s)", exc)


def _size(self, queue):
    """Messages waiting in `queue`, read outside MULTI: a full Redis refuses every command queued in one,
    even these reads, and Celery declares (so counts) its queues each time it (re)connects."""
    with self.conn_or_acquire() as client:
        pipe = client.pipeline(transaction=False)
        for pri in self.priority_steps:
            pipe.llen(self._q_for_pri(queue, pri))
        return sum(size for size in pipe.execute() if isinstance(size, numbers.Integral))


def _has_queue(self, queue, **kwargs):
    with self.conn_or_acquire() as client:
        pipe = client.pipeline(transaction=False)
        for pri in self.priority_steps:
            pipe.exists(self._q_for_pri(queue, pri))
        return any(pipe.execute())


_kombu_queue_bind = kombu_redis.Channel._queue_bind


def _queue_bind(self, exchange, routing_key, pattern, queue):
    """kombu's binding (SADDs, or a script for an expiring queue; both idempotent), made again after
    each reconnect: waits while Redis refuses it, as taking a message does."""
    with _replica_is_a_lost_connection():
        until_written("binding a queue", _kombu_queue_bind, self, exchange, routing_key, pattern, queue)


_kombu_brpop_read = kombu_redis.Channel._brpop_read


def _brpop_read(self, **options):
    """kombu's read of the consuming BRPOP's reply."""
    with _replica_is_a_lost_connection():
        return _kombu_brpop_read(self, **options)


PATCHES = {"QoS": QoS, "_size": _size, "_has_queue": _has_queue, "_queue_bind": _queue_bind,
           "_brpop_read": _brpop_read}
"""What `install` sets on kombu's Redis channel class."""

KOMBU = {name: getattr(kombu_redis.Channel, name) for name in PATCHES}
"""What kombu itself had there, read before any `install` (for the tests to compare with)."""


def install() -> None:
    """Every Redis channel of this process (Sentinel's too: it subclasses the plain one) rides out refusals
    as above."""
    for name, value in PATCHES.items():
        setattr(kombu_redis.Channel, name, value)
