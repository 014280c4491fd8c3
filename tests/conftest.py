"""Fixtures: a real Redis (flushed per test), real API and worker processes, real HTTP. The harness
they use is `harness/`, shared with the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from harness.hubstub import TINY_REPO
from harness.stack import TEST_REDIS_URL, Stack


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: most tests wait on worker processes starting and pages crossing Redis, not on a core,
    so two test processes a core, up to the eight databases below 15 that are left alone."""
    return max(2, min(2 * (os.cpu_count() or 1), 8))


def pytest_collection_modifyitems(items) -> None:
    """Every test that starts a stack's processes is `slow` (`-m "not slow"` runs the rest in seconds)."""
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def redis_url():
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    yield TEST_REDIS_URL
    client.flushdb()


@pytest.fixture
def stack(tmp_path, redis_url):
    s = Stack(tmp_path, redis_url)
    yield s
    s.stop()


@pytest.fixture
def acl_redis(stack, tmp_path):
    """A private Redis whose `worker` user can be refused keys (`harness.redisproc.deny_job_keys`) while
    the admin keeps them: (admin client, the worker user's URL). The stack's processes use the admin's."""
    from harness.redisproc import PrivateRedis

    private = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    admin = redis.Redis.from_url(private.url)
    admin.acl_setuser("worker", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all"])
    stack.env["REDIS_URL"] = private.url
    yield admin, f"redis://worker:pw@127.0.0.1:{private.port}/0"
    private.stop()


@pytest.fixture
def emulator():
    """A GCS emulator that can version buckets (fake-gcs-server's in-memory backend); yields a client for
    it and its address."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from harness.gcsemulator import start_emulator

    server = start_emulator(backend="memory")
    try:
        yield storage.Client(project="test", credentials=AnonymousCredentials()), server.url
    finally:
        server.stop()


@pytest.fixture
def pair(tmp_path):
    """A primary and its replica, each a private Redis with AOF; the replica follows through a link that
    can hold the replication stream back (`HoldingProxy`): yields (primary, link, replica)."""
    from harness.redisproc import PrivateRedis
    from harness.stack import wait_until
    from tests.redisproxy import HoldingProxy

    primary = PrivateRedis(tmp_path / "primary").start()
    link = HoldingProxy(primary.port)
    replica = PrivateRedis(tmp_path / "replica").start(extra=["--replicaof", "127.0.0.1", str(link.port)])
    admin = redis.Redis(port=replica.port)
    wait_until(lambda: admin.info("replication").get("master_link_status") == "up", timeout=15,
               message="the replica to sync")
    yield primary, link, replica
    link.cut()
    primary.stop()
    replica.stop()


@pytest.fixture
def bucket():
    """A bucket `scans` in a GCS emulator of its own, which STORAGE_EMULATOR_HOST names meanwhile; yields the
    bucket and the emulator's address."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from harness.gcsemulator import start_emulator

    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    server = start_emulator()
    try:
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        yield client.create_bucket("scans"), os.environ["STORAGE_EMULATOR_HOST"]
    finally:
        server.stop()
        if saved is not None:
            os.environ["STORAGE_EMULATOR_HOST"] = saved


@pytest.fixture(params=["redis", "directory"])
def both_stores(request, stack, tmp_path):
    """Runs a test with inputs in Redis and again with inputs in a shared directory (GNOSIS_INPUT_STORE)."""
    if request.param == "directory":
        stack.env["GNOSIS_INPUT_STORE"] = str(tmp_path / "inputs")
    return request.param


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from harness.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def hub(tiny_model):
    """A stand-in hub on loopback serving the tiny model: the real download and cache code runs on it."""
    from harness.hubstub import HubStub

    stub = HubStub(TINY_REPO, tiny_model).start()
    yield stub
    stub.stop()


