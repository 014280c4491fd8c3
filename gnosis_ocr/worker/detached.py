"""A Redis channel used after its connection was closed fails as a lost connection, never as an
"Unrecoverable error" that stops the worker.

When Redis goes away, Celery (5.7) closes the broken connection twice: `collect()`, which also detaches
the transport from the connection (`transport.client = None`), then `close()`. kombu's Redis channel
begins its close by reading the reply of a BRPOP in flight; with Redis gone that read raises, so the
first close stops there and the channel stays open. The second close then puts the channel's
unacknowledged messages back through the detached transport, and building a Redis client from it raised
AttributeError (`'NoneType' object has no attribute 'hostname'`). Celery ignores connection errors
there, not that one: it was an "Unrecoverable error", and the worker stopped once its pages ended. Any
worker that holds a page and waits for the next one (a BRPOP in flight: a threads pool, or prefork with
concurrency above 1) met it when Redis died or restarted: 3 workers of 3 at one restart in a soak. The
acknowledgement of a page ending after the reconnect, sent on that old channel, failed the same way.

Here such a channel raises redis's ConnectionError instead, which both callers take for what it is.
Nothing is lost by not putting the messages back from this process: they are in Redis's set of
unacknowledged messages, where the reconciler (or the broker's visibility timeout) finds them.
"""

from __future__ import annotations

import redis
from kombu.transport import redis as kombu_redis

_kombu_connparams = kombu_redis.Channel._connparams


def _connparams(self, asynchronous=False):
    transport = self.connection
    if transport is None or transport.client is None:
        raise redis.exceptions.ConnectionError("this channel's broker connection was closed")
    return _kombu_connparams(self, asynchronous)


def install() -> None:
    """For every Redis channel of this process (Sentinel's too: it subclasses the plain one)."""
    kombu_redis.Channel._connparams = _connparams
