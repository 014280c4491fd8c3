"""kombu's Redis bookkeeping against a Redis that refuses writes (gnosis_ocr.worker.refusals), on real
Redis servers: what Celery's loop would otherwise meet as an "Unrecoverable error" and stop the worker."""

from __future__ import annotations

import json

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as kombu_redis

from gnosis_ocr.worker import refusals
from harness.redisproc import PrivateRedis, follow
from harness.stack import wait_until


def taken(client: redis.Redis, tag: str) -> None:
    """A message as kombu records it once a consumer has taken it."""
    client.hset("unacked", tag, json.dumps([{"body": "x"}, "ocr", "ocr"]))
    client.zadd("unacked_index", {tag: 1.0})


def channel_methods(monkeypatch, methods: dict) -> None:
    """kombu's Redis channel with `methods` (refusals.KOMBU or refusals.PATCHES) for this test only: importing
    the Celery app, as an earlier test in this process may have, installs the patches for good."""
    for name, value in methods.items():
        monkeypatch.setattr(kombu_redis.Channel, name, value)


@pytest.fixture
def full_redis(tmp_path):
    private = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    client = redis.Redis.from_url(private.url)
    taken(client, "page-1")
    client.config_set("maxmemory", max(client.info("memory")["used_memory"] - 2**16, 2**16))
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("anything", "1")
    yield private, client
    private.stop()


def test_an_acknowledgement_goes_through_while_redis_is_out_of_memory(full_redis):
    private, client = full_redis
    with Connection(private.url) as conn:
        with pytest.raises(redis.exceptions.OutOfMemoryError):  # kombu's: a MULTI, refused whole
            kombu_redis.QoS(conn.default_channel).ack("page-1")
        refusals.QoS(conn.default_channel).ack("page-1")
    assert not client.hexists("unacked", "page-1") and client.zscore("unacked_index", "page-1") is None


def test_a_periodic_restore_is_skipped_while_redis_is_out_of_memory(full_redis):
    private, _ = full_redis
    with Connection(private.url) as conn:
        with pytest.raises(redis.exceptions.OutOfMemoryError):  # kombu's: its mutex is a write
            kombu_redis.QoS(conn.default_channel).restore_visible(interval=1)
        refusals.QoS(conn.default_channel).restore_visible(interval=1)  # skipped; the next sweep restores


def test_a_write_refused_by_a_node_that_became_a_replica_is_a_lost_connection(tmp_path):
    primary = PrivateRedis(tmp_path / "primary").start()
    replica = PrivateRedis(tmp_path / "replica").start()
    try:
        follow(replica.port, primary.port)
        with Connection(replica.url) as conn:
            with pytest.raises(redis.exceptions.ReadOnlyError):  # kombu's: Celery calls it unrecoverable
                kombu_redis.QoS(conn.default_channel).ack("page-1")
            with pytest.raises(conn.connection_errors):  # ours: Celery reconnects, as after a primary's death
                refusals.QoS(conn.default_channel).ack("page-1")
    finally:
        replica.stop()
        primary.stop()


def test_a_queue_is_declared_while_redis_is_out_of_memory_and_bound_once_it_has_room(full_redis, monkeypatch, caplog):
    """Celery declares and binds its queues on every (re)connect; kombu counts the messages in a MULTI, which a
    full Redis refuses whole, reads included."""
    import threading

    from kombu import Exchange, Queue

    private, client = full_redis
    client.config_set("maxmemory", max(client.info("memory")["used_memory"] // 2, 2**16))
    queue = Queue("ocr", Exchange("ocr"), "ocr")
    channel_methods(monkeypatch, refusals.KOMBU)  # kombu's own first, whatever an earlier test installed
    with Connection(private.url) as conn:
        with pytest.raises(redis.exceptions.OutOfMemoryError):  # kombu's: Celery calls it unrecoverable
            queue(conn.default_channel).declare()
    channel_methods(monkeypatch, refusals.PATCHES)
    with Connection(private.url) as conn:
        channel = conn.default_channel
        assert channel.queue_declare("ocr").message_count == 0  # counted at once: reads outside MULTI
        done = threading.Event()
        threading.Thread(target=lambda: (queue(channel).declare(), done.set()), daemon=True).start()
        wait_until(lambda: "waiting for room before binding a queue" in caplog.text, timeout=15,
                   message="the binding to wait for room")
        assert not done.is_set()
        client.config_set("maxmemory", 0)
        wait_until(done.is_set, timeout=15, message="the binding to go through")
    assert client.smembers("_kombu.binding.ocr") == {b"ocr\x06\x16\x06\x16ocr"}


def test_a_message_whose_acknowledgement_failed_holds_no_prefetch_slot_and_is_delivered_again(tmp_path, monkeypatch):
    """A worker of one pool process takes one message at a time. kombu kept a message whose acknowledgement
    Redis refused (here: its node was demoted in between) as held by the channel for good, so that worker
    took nothing more while its loop turned and its heartbeat said it was alive."""
    primary = PrivateRedis(tmp_path / "primary", appendonly=False).start()
    other = PrivateRedis(tmp_path / "other", appendonly=False).start()
    client = redis.Redis(port=primary.port)
    try:
        follow(other.port, primary.port)
        taken = {}
        for flavour, patches in (("kombu", refusals.KOMBU), ("ours", refusals.PATCHES)):
            channel_methods(monkeypatch, patches)
            conn = Connection(primary.url)
            channel = conn.channel()
            channel.basic_qos(0, 1, False)
            channel.basic_publish(channel.prepare_message(flavour), "", "ocr")
            taken[flavour] = (conn, channel, channel.basic_get("ocr", no_ack=False))
            assert taken[flavour][2] is not None and not channel.qos.can_consume()
        follow(primary.port, other.port)  # demoted under both channels

        _, channel, message = taken["kombu"]
        with pytest.raises(redis.ResponseError):  # a MULTI, refused whole (EXECABORT)
            channel.basic_ack(message.delivery_tag)
        assert not channel.qos.can_consume()  # the slot is held for good

        conn, channel, message = taken["ours"]
        with pytest.raises(conn.connection_errors):  # Celery logs it, and reconnects on the next BRPOP
            channel.basic_ack(message.delivery_tag)
        assert channel.qos.can_consume()

        # Primary again: closing each channel (as Celery's reconnect does) puts what it held back in the queue.
        follow(other.port, primary.port)
        for conn, _, _ in taken.values():
            conn.release()
        assert client.llen("ocr") == 2 and client.hlen("unacked") == 0
    finally:
        other.stop()
        primary.stop()
