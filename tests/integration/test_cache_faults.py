"""The model cache under a flaky or slow bucket and a Redis that goes away: a holder that cannot renew
stops, a downloader that lost its lease deletes nothing, a host that cannot read the mount marks
nothing corrupt, `cache verify` holds the lease, a metadata-only rewrite is re-hashed once, and a
transfer that hangs without an error is stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis as redis_lib

from gnosis_ocr.cache import manifest as mf
from gnosis_ocr.cache.state import CacheState, manifest_path
from gnosis_ocr.cache.store import ModelCache
from gnosis_ocr.errors import CacheUnreadable, DownloadStalled, ModelCacheError
from gnosis_ocr.settings import Settings
from harness.hubstub import TINY_REPO, HubStub
from harness.redisproc import PrivateRedis
from harness.stack import ROOT

pytestmark = pytest.mark.slow


def cache_for(tmp_path: Path, redis_url: str, stub: HubStub, **env: str) -> ModelCache:
    os.environ["HF_ENDPOINT"] = stub.url  # read by huggingface_hub in the fetch process
    settings = Settings.from_env({"MODEL_CACHE_PATH": str(tmp_path / "cache"), "OCR_MODEL_ID": TINY_REPO,
                                  "REDIS_URL": redis_url, "GNOSIS_LEASE_TTL": "3", **env})
    return ModelCache(settings, redis_lib.Redis.from_url(redis_url))


@pytest.fixture
def warm(tmp_path, redis_url, tiny_model, endpoint):
    """A cache filled from a stand-in hub: (the cache, the hub, the snapshot's path)."""
    stub = HubStub(TINY_REPO, tiny_model).start()
    try:
        cache = cache_for(tmp_path, redis_url, stub)
        yield cache, stub, cache.ensure_ready()
    finally:
        stub.stop()


@pytest.fixture
def endpoint():
    saved = os.environ.get("HF_ENDPOINT")
    yield
    if saved is None:
        os.environ.pop("HF_ENDPOINT", None)
    else:
        os.environ["HF_ENDPOINT"] = saved


def test_a_holder_that_cannot_renew_for_its_ttl_gives_the_lease_up(tmp_path):
    from gnosis_ocr.cache.lease import Lease

    private = PrivateRedis(tmp_path / "redis", appendonly=False).start()
    lost = threading.Event()
    lease = Lease(redis_lib.Redis.from_url(private.url, socket_timeout=0.5), "gnosis:test:repo", ttl=1.5)
    try:
        assert lease.acquire()
        lease.on_lost = lost.set  # in the cache: kill the fetch process
        private.stop()  # unreachable: Redis may hand the lease on once its TTL runs out
        # Without the deadline it never gives up (renewal errors are retried for ever).
        assert lost.wait(10), "the holder kept its lease with Redis unreachable past the TTL"
    finally:
        lease.stop_heartbeat()


def test_a_downloader_that_lost_its_lease_deletes_nothing(warm, redis_url):
    cache, _, snapshot = warm
    damaged = snapshot / "config.json"
    damaged.resolve().write_text("{}")  # a file the downloader would delete and fetch again
    cache.redis.set(cache.lease.key, "another-host:1:abc#99")  # the lease moved on to a new holder
    # As the cache spawns it: online (another test in this process may have set HF_HUB_OFFLINE).
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["GNOSIS_FETCH_REDIS_URL"] = redis_url
    r = subprocess.run([sys.executable, "-m", "gnosis_ocr.cache.fetch", "--repo", TINY_REPO, "--revision", "main",
                        "--cache-dir", cache.settings.hub_cache, "--lease-key", cache.lease.key,
                        "--lease-value", "this-host:2:def#98"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 1 and '"LeaseLost"' in r.stdout, r.stdout + r.stderr
    assert damaged.exists() and damaged.read_text() == "{}", "the old holder deleted the new holder's file"


def test_a_host_that_cannot_read_the_mount_marks_nothing_corrupt(warm):
    cache, stub, snapshot = warm
    entry = snapshot / "config.json"
    target = os.readlink(entry)
    entry.unlink()
    entry.symlink_to(entry.name)  # stat fails with ELOOP: this host cannot read it, as with EIO
    with pytest.raises(CacheUnreadable):
        cache.complete_snapshot(stub.sha)
    assert CacheState(cache.redis, cache.settings).record().get("state") == "ready"
    assert os.path.exists(manifest_path(cache.settings, stub.sha)), "nothing may be invalidated for it"
    entry.unlink()
    entry.symlink_to(target)
    assert cache.complete_snapshot(stub.sha) is not None


def test_verify_holds_the_lease_and_refuses_while_a_download_runs(warm):
    cache, stub, _ = warm
    other = ModelCache(cache.settings, cache.redis)
    assert other.lease.acquire()  # a download (or another verify) under way
    try:
        with pytest.raises(ModelCacheError) as caught:
            cache.verify()
        assert caught.value.code == "cache_busy"
    finally:
        other.lease.release()
    assert cache.verify() == (stub.sha, [])
    assert cache.lease.holder() is None, "verify released the lease"


def test_a_metadata_only_rewrite_of_the_bucket_is_rehashed_once(warm):
    cache, stub, snapshot = warm
    later = time.time() + 60
    for entry in snapshot.iterdir():  # a storage-class change or a copy: same bytes, new mtimes
        os.utime(entry.resolve(), (later, later))
    manifest = mf.read(manifest_path(cache.settings, stub.sha))
    assert len(mf.check(manifest, str(snapshot)).rehashed) == len(manifest.files)
    assert cache.ensure_ready() == snapshot  # re-hashes, matches, and records the new mtimes
    manifest = mf.read(manifest_path(cache.settings, stub.sha))
    assert mf.check(manifest, str(snapshot)).rehashed == {}, "the next start would re-hash everything again"


def test_a_download_that_hangs_without_an_error_is_stopped(tmp_path, redis_url, tiny_model, endpoint,
                                                           monkeypatch):
    stub = HubStub(TINY_REPO, tiny_model, stall_after=64 * 1024).start()
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "600")  # the client itself would wait ten minutes
    try:
        cache = cache_for(tmp_path, redis_url, stub, GNOSIS_DOWNLOAD_STALL_TIMEOUT="2", GNOSIS_LEASE_WAIT="60")
        started = time.monotonic()
        with pytest.raises(DownloadStalled):
            cache.ensure_ready()
        assert time.monotonic() - started < 30
        assert cache.lease.holder() is None, "the stalled holder let the lease go for another try"
    finally:
        stub.stop()
