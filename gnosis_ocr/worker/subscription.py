"""A dropped pub/sub subscription is a lost connection, never a silent stall of the worker.

Every Celery worker holds one Redis pub/sub subscription beside its BRPOP (remote control, which Flower
uses). kombu reads it with a blocking `parse_response()` when the event loop sees its socket readable.
With a retry on the connection (the transport's `retry_on_timeout` gives one, for ConnectionError too),
a subscription that Redis dropped is reconnected *inside* that read by redis-py, which resubscribes and
then blocks reading the new socket, where nothing arrives: the event loop, and so all consuming, stopped
for good, while the heartbeat thread kept reporting the worker alive, so no other worker took over its
pages. A connection is dropped under a live Redis by a proxy's or load balancer's idle timeout (the
subscription is idle but for a PING every 25 s), a network blip, `CLIENT KILL`, or Redis's own
`client-output-buffer-limit pubsub`. (A graceful Sentinel failover did not stall a worker here.)

Here the subscription's connection never retries: the read raises, kombu hands the error to Celery,
and Celery reconnects the whole consumer, as it does for its BRPOP connection.
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_kombu_receive_one = kombu_redis.Channel._receive_one


def _receive_one(self, c):
    connection = c.connection
    if connection is not None and connection.retry.get_retries():
        connection.retry = Retry(NoBackoff(), 0)
    return _kombu_receive_one(self, c)


def install() -> None:
    """For every Redis channel of this process (Sentinel's too: it subclasses the plain one)."""
    kombu_redis.Channel._receive_one = _receive_one
